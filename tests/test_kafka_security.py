"""Kafka's side of "nobody gets in where they do not belong": SCRAM logins, ACLs per principal,
SASL_SSL with the stack's CA, and settings that say which variable is wrong.

Against the real stack (`deploy/stack up`): its broker runs the StandardAuthorizer with
allow.everyone.if.no.acl.found=false, and provision() grants the ACLs of services/core/access.py
on each run's own topics.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from services.client import LayerService
from services.core import access, acls, kafka
from services.core.kafka import KafkaRefused, connection
from services.core.login import login_problem
from services.core.principals import Principal, stack_users
from services.core.provision import provision, remove_topics
from services.core.settings import Settings, SettingsError
from tests.conftest import ROOT, own_topics, run_topics, settings_env

STACK_CACHE = Path(os.environ.get("LAYERLOG_CACHE") or ROOT / ".cache")


def tls_listener(settings: Settings) -> tuple[str, str]:
    """The stack's SASL_SSL listener and its CA file, found the way deploy/stack sets them."""
    host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    ssl_port = os.environ.get("LAYERLOG_KAFKA_SSL_PORT") or str(int(port) + 2)
    return f"{host}:{ssl_port}", str(STACK_CACHE / "kafka" / "tls" / "ca.crt")


async def produce(
    settings: Settings, principal: Principal, topic: str, value: bytes
) -> tuple[TopicPartition, int]:
    """Writes one record as `principal` the way the services do (an idempotent producer);
    returns where it landed."""
    producer = kafka.producer(settings, principal, request_timeout_ms=10_000)
    await producer.start()
    try:
        sent = await asyncio.wait_for(producer.send_and_wait(topic, value, key=b"k"), 30)
        return sent.topic_partition, sent.offset
    finally:
        await producer.stop()


async def forge(settings: Settings, principal: Principal, topic: str) -> None:
    """Writes one record as `principal` with a plain producer: an idempotent one is refused
    before it gets to the topic (CLUSTER_AUTHORIZATION_FAILED) by a principal that may write
    nowhere, and a forger picks the producer that gets furthest."""
    producer = AIOKafkaProducer(**connection(settings, principal), request_timeout_ms=10_000)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, b"a forged record", key=b"k"), 30)
    finally:
        await producer.stop()


async def read_back(
    settings: Settings, principal: Principal, where: tuple[TopicPartition, int]
) -> bytes:
    tp, offset = where
    consumer = AIOKafkaConsumer(**connection(settings, principal), enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        batch = await consumer.getmany(tp, timeout_ms=10_000)
        for record in batch.get(tp, []):
            if record.offset == offset:
                return record.value or b""
        raise AssertionError(f"no record at {tp}@{offset}")
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
async def own(settings: Settings):
    """Topics of this module's own, with the same ACLs as every run's."""
    async with own_topics(settings, "security") as own:
        yield own


# What the broker lets each principal do


@pytest.mark.parametrize(
    "principal", [Principal.CLIENT, Principal.REGISTRY, Principal.QUERY, Principal.AUDITOR]
)
async def test_a_principal_that_is_not_the_worker_or_the_verifier_cannot_write_events(
    own: Settings, principal: Principal
):
    with pytest.raises(TopicAuthorizationFailedError):
        await forge(own, principal, own.events_topic)


@pytest.mark.parametrize("principal", [Principal.UPLOAD_WORKER, Principal.VERIFIER, Principal.GC])
async def test_the_worker_the_verifier_and_the_collector_may_write_events(
    own: Settings, principal: Principal
):
    value = f"an event by {principal} {uuid.uuid4()}".encode()
    where = await produce(own, principal, own.events_topic, value)
    assert await read_back(own, Principal.AUDITOR, where) == value


@pytest.mark.parametrize("principal", [Principal.CLIENT, Principal.REGISTRY])
async def test_the_client_and_the_registry_put_commands_on_the_log(
    own: Settings, principal: Principal
):
    value = f"a command by {principal} {uuid.uuid4()}".encode()
    where = await produce(own, principal, own.commands_topic, value)
    assert await read_back(own, Principal.UPLOAD_WORKER, where) == value


async def test_the_client_cannot_read_the_events(own: Settings):
    consumer = AIOKafkaConsumer(
        own.events_topic, **connection(own, Principal.CLIENT), enable_auto_commit=False
    )
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(consumer.start(), 30)
    finally:
        await consumer.stop()
    with pytest.raises(TopicAuthorizationFailedError):
        await kafka.topic_partitions(own, Principal.CLIENT, own.events_topic)


async def test_the_collector_reads_events_and_writes_no_commands(own: Settings):
    value = f"an event for the collector {uuid.uuid4()}".encode()
    where = await produce(own, Principal.VERIFIER, own.events_topic, value)
    assert await read_back(own, Principal.GC, where) == value
    for topic in (own.commands_topic, own.dead_letter_topic):
        with pytest.raises(TopicAuthorizationFailedError):
            await forge(own, Principal.GC, topic)


async def test_the_collector_may_use_its_own_transactional_id_only(own: Settings):
    ours = kafka.producer(
        own,
        Principal.GC,
        transactional_id=kafka.gc_transactional_id(own),
        request_timeout_ms=10_000,
    )
    await asyncio.wait_for(ours.start(), 30)
    await ours.stop()
    theirs = kafka.producer(
        own,
        Principal.GC,
        transactional_id=kafka.transactional_id("verifier", own.events_topic, 0),
        request_timeout_ms=10_000,
    )
    try:
        with pytest.raises(TransactionalIdAuthorizationFailed):
            await asyncio.wait_for(theirs.start(), 30)
    finally:
        await theirs.stop()


async def test_the_auditor_writes_nothing(own: Settings):
    for topic in (own.commands_topic, own.events_topic, own.dead_letter_topic):
        with pytest.raises(TopicAuthorizationFailedError):
            await forge(own, Principal.AUDITOR, topic)


async def test_acls_name_the_topics_exactly_not_a_prefix_of_them(own: Settings):
    # A topic whose name starts with the commands topic's: the client's ACL does not reach it.
    lookalike = own.commands_topic + "-lookalike"
    admin = kafka.admin(own, Principal.ADMIN)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(lookalike, 1, 1)])
        with pytest.raises(TopicAuthorizationFailedError):
            await forge(own, Principal.CLIENT, lookalike)
    finally:
        await admin.delete_topics([lookalike])
        await admin.close()


async def test_the_sdk_stops_at_a_refusal_instead_of_retrying_until_its_deadline(own: Settings):
    # A commands topic the client has no ACL on: the SDK says so at once.
    unlisted = own.commands_topic + "-unlisted"
    admin = kafka.admin(own, Principal.ADMIN)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(unlisted, 1, 1)])
        started = time.monotonic()
        async with LayerService(replace(own, commands_topic=unlisted), finish_timeout=120) as ls:
            with pytest.raises(KafkaRefused, match="TopicAuthorizationFailedError"):
                await ls.upload("security/refused")
        assert time.monotonic() - started < 60
    finally:
        await admin.delete_topics([unlisted])
        await admin.close()


async def test_a_plaintext_client_gets_nowhere(own: Settings):
    producer = AIOKafkaProducer(
        bootstrap_servers=own.kafka_bootstrap,
        security_protocol="PLAINTEXT",
        request_timeout_ms=5000,
    )
    with pytest.raises(KafkaError):
        await asyncio.wait_for(producer.start(), 30)
    await producer.stop()


def test_the_stack_configuration_has_no_plaintext_listener():
    template = (ROOT / "deploy" / "kafka" / "server.properties.in").read_text()
    config = dict(
        line.split("=", 1) for line in template.splitlines() if line and not line.startswith("#")
    )
    listeners = config["listeners"].split(",")
    assert [listener.split("://")[0] for listener in listeners] == [
        "SASL_PLAINTEXT",
        "SASL_SSL",
        "CONTROLLER",
    ]
    protocols = dict(
        pair.split(":") for pair in config["listener.security.protocol.map"].split(",")
    )
    assert "PLAINTEXT" not in protocols.values()
    assert config["allow.everyone.if.no.acl.found"] == "false"
    assert config["authorizer.class.name"].endswith("StandardAuthorizer")


# Granting ACLs (services/core/acls.py, the seam)


async def test_provision_grants_each_acl_once_and_remove_topics_takes_them_back(settings):
    mine = replace(settings, **run_topics(f"acls-{uuid.uuid4().hex[:8]}"))
    wanted = set(access.bindings(mine))
    await provision(mine, timeout=30)
    try:
        assert await acls.granted(mine, wanted) == wanted
        assert await acls.grant(mine, wanted) == 0  # a second provision changes nothing
        assert await acls.granted(mine, wanted) == wanted
    finally:
        await remove_topics(mine)
    assert await acls.granted(mine, wanted) == set()


def test_every_service_principal_has_a_stack_user_and_acls():
    granted = {binding.principal for binding in access.bindings(Settings())}
    assert granted == set(Principal) - {Principal.ADMIN}  # the admin is a super user
    assert set(stack_users()) == {"broker", *Principal}


# Logins that fail say why


async def test_a_wrong_password_is_refused_with_the_reason(own: Settings, tmp_path: Path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    bad = replace(own, kafka_sasl_password_file=str(wrong))
    problem = await login_problem(bad, Principal.CLIENT)
    assert isinstance(problem, KafkaRefused)
    assert "refused user 'client'" in str(problem)
    assert "invalid credentials" in str(problem)
    # The SDK raises it instead of "Unable to bootstrap".
    with pytest.raises(KafkaRefused, match="refused user 'client'"):
        async with LayerService(bad):
            pass
    assert await login_problem(own, Principal.CLIENT) is None  # the right one logs in


def run_service(name: str, settings: Settings, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", name],
        env={**settings_env(settings), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_service_with_a_wrong_password_stops_at_once_saying_so(own: Settings, tmp_path: Path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    done = run_service("upload-worker", own, LAYERLOG_KAFKA_SASL_PASSWORD_FILE=str(wrong))
    assert done.returncode == 2, done.stderr
    assert "refused user 'upload-worker'" in done.stderr


def test_a_service_without_its_password_file_stops_naming_the_variable(
    own: Settings, tmp_path: Path
):
    done = run_service("verifier", own, LAYERLOG_KAFKA_CREDENTIALS_DIR=str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "LAYERLOG_KAFKA_CREDENTIALS_DIR" in done.stderr
    assert str(tmp_path / "verifier.password") in done.stderr


# SASL_SSL with the stack's own CA


async def test_sasl_ssl_with_the_stack_ca_produces_and_consumes(own: Settings):
    bootstrap, ca_file = tls_listener(own)
    tls = replace(
        own, kafka_bootstrap=bootstrap, kafka_security_protocol="SASL_SSL", kafka_ca_file=ca_file
    )
    tls.validate()
    value = f"over TLS {uuid.uuid4()}".encode()
    where = await produce(tls, Principal.CLIENT, tls.commands_topic, value)
    assert await read_back(tls, Principal.UPLOAD_WORKER, where) == value


async def test_sasl_ssl_without_the_ca_does_not_connect(own: Settings):
    bootstrap, _ = tls_listener(own)
    tls = replace(own, kafka_bootstrap=bootstrap, kafka_security_protocol="SASL_SSL")
    problem = await login_problem(tls, Principal.CLIENT)
    assert isinstance(problem, KafkaRefused)
    assert "does not verify" in str(problem)
    producer = kafka.producer(tls, Principal.CLIENT, request_timeout_ms=5000)
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(producer.start(), 30)
    await producer.stop()


# Settings


def test_the_defaults_are_the_local_stack_s_sasl():
    settings = Settings.from_env({})
    assert settings.kafka_security_protocol == "SASL_PLAINTEXT"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka_credentials_dir == ".cache/kafka/credentials"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LAYERLOG_KAFKA_SECURITY_PROTOCOL": "SSL"}, "LAYERLOG_KAFKA_SECURITY_PROTOCOL"),
        (
            {"LAYERLOG_KAFKA_SECURITY_PROTOCOL": "sasl_plaintext"},
            "LAYERLOG_KAFKA_SECURITY_PROTOCOL",
        ),
        ({"LAYERLOG_KAFKA_SASL_MECHANISM": "GSSAPI"}, "LAYERLOG_KAFKA_SASL_MECHANISM"),
        ({"LAYERLOG_KAFKA_SASL_MECHANISM": "SCRAM-SHA-1"}, "LAYERLOG_KAFKA_SASL_MECHANISM"),
        ({"LAYERLOG_KAFKA_SASL_USER": "two words"}, "LAYERLOG_KAFKA_SASL_USER"),
        # Credentials that PLAINTEXT would silently drop.
        (
            {"LAYERLOG_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT", "LAYERLOG_KAFKA_SASL_USER": "me"},
            "LAYERLOG_KAFKA_SASL_USER",
        ),
        (
            {
                "LAYERLOG_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
                "LAYERLOG_KAFKA_SASL_PASSWORD_FILE": "/etc/hostname",
            },
            "LAYERLOG_KAFKA_SASL_PASSWORD_FILE",
        ),
        # A CA file is for SASL_SSL, and must be there.
        ({"LAYERLOG_KAFKA_CA_FILE": "/etc/hostname"}, "LAYERLOG_KAFKA_CA_FILE"),
        (
            {
                "LAYERLOG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "LAYERLOG_KAFKA_CA_FILE": "/nonexistent/ca.crt",
            },
            "LAYERLOG_KAFKA_CA_FILE",
        ),
        ({"LAYERLOG_KAFKA_CREDENTIALS_DIR": "   "}, "LAYERLOG_KAFKA_CREDENTIALS_DIR"),
    ],
)
def test_a_bad_kafka_security_value_names_its_variable(env: dict[str, str], variable: str):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_a_missing_password_file_names_the_file_and_the_variable(tmp_path: Path):
    settings = Settings.from_env({"LAYERLOG_KAFKA_CREDENTIALS_DIR": str(tmp_path)})
    with pytest.raises(SettingsError, match="LAYERLOG_KAFKA_CREDENTIALS_DIR") as raised:
        settings.kafka_login(Principal.QUERY)
    assert str(tmp_path / "query.password") in str(raised.value)
    override = replace(settings, kafka_sasl_password_file=str(tmp_path / "nope"))
    with pytest.raises(SettingsError, match="LAYERLOG_KAFKA_SASL_PASSWORD_FILE"):
        override.kafka_login(Principal.QUERY)
    (tmp_path / "query.password").write_text("\n")
    with pytest.raises(SettingsError, match="is empty"):
        settings.kafka_login(Principal.QUERY)


def test_an_unreadable_ca_file_names_the_variable(tmp_path: Path):
    garbage = tmp_path / "ca.crt"
    garbage.write_text("not a certificate\n")
    settings = Settings.from_env(
        {"LAYERLOG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "LAYERLOG_KAFKA_CA_FILE": str(garbage)}
    )
    (tmp_path / "client.password").write_text("secret\n")
    with pytest.raises(SettingsError, match="LAYERLOG_KAFKA_CA_FILE"):
        connection(replace(settings, kafka_credentials_dir=str(tmp_path)), Principal.CLIENT)


def test_each_principal_logs_in_as_itself_unless_a_user_is_set(tmp_path: Path):
    for name in ("query", "ops"):
        (tmp_path / f"{name}.password").write_text(f"{name}-secret\n")
    settings = Settings.from_env({"LAYERLOG_KAFKA_CREDENTIALS_DIR": str(tmp_path)})
    login = settings.kafka_login(Principal.QUERY)
    assert login is not None
    assert (login.user, login.password) == ("query", "query-secret")
    assert "query-secret" not in repr(login)  # a password never reaches a log line
    shared = replace(settings, kafka_sasl_user="ops")
    login = shared.kafka_login(Principal.QUERY)
    assert login is not None
    assert (login.user, login.password) == ("ops", "ops-secret")
    plain = Settings.from_env({"LAYERLOG_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"})
    assert plain.kafka_login(Principal.QUERY) is None
    assert "sasl_plain_username" not in connection(plain, Principal.QUERY)
