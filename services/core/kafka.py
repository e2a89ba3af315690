"""Kafka plumbing shared by the services: clients configured one way, and topic provisioning."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from services.core.principals import Principal
from services.core.settings import MAX_CHUNK_CEILING, MIB, Settings, SettingsError

log = logging.getLogger(__name__)

# Room for the largest chunk plus the record's Avro envelope.
MAX_RECORD_BYTES = MAX_CHUNK_CEILING + MIB
COMMAND_RETENTION_MS = 7 * 24 * 3600 * 1000

# Kafka said no to who we are or to what we asked: retrying changes nothing.
REFUSALS = (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


class KafkaRefused(Exception):
    """Kafka refused a principal: wrong credentials, or no ACL allows what it asked. Retrying
    changes neither, so services stop with this rather than retry."""


def refused(error: BaseException) -> bool:
    return isinstance(error, REFUSALS)


def connection(settings: Settings, principal: Principal) -> dict[str, object]:
    """Where Kafka is and how `principal` logs in: the options every aiokafka client takes.

    Raises SettingsError when the principal's password (or the CA file) cannot be read."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    login = settings.kafka_login(principal)
    if login is not None:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = login.user
        options["sasl_plain_password"] = login.password
    if settings.kafka_security_protocol == "SASL_SSL":
        options["ssl_context"] = _tls_context(settings.kafka_ca_file)
    return options


def _tls_context(ca_file: str) -> ssl.SSLContext:
    """Verifies the broker's certificate and host name, against ca_file or the system's CAs."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (ssl.SSLError, OSError) as error:
        raise SettingsError(
            f"LAYERLOG_KAFKA_CA_FILE: {ca_file} holds no usable CA certificate ({error})"
        ) from None


def producer(settings: Settings, principal: Principal, **overrides: object) -> AIOKafkaProducer:
    """An idempotent producer: a retried send never writes a record twice."""
    options: dict[str, object] = {
        **connection(settings, principal),
        "enable_idempotence": True,
        "acks": "all",
        "max_request_size": MAX_RECORD_BYTES,
        "linger_ms": 2,
        # Right after a commit the coordinator answers the next transaction's first request with
        # CONCURRENT_TRANSACTIONS until the markers are written; the default 100 ms backoff then
        # dominated every command's latency.
        "retry_backoff_ms": 10,
        "request_timeout_ms": 30_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(
    settings: Settings,
    principal: Principal,
    topics: Sequence[str],
    group_id: str | None,
    **overrides: object,
) -> AIOKafkaConsumer:
    """A read_committed consumer that commits offsets only when the service says so."""
    options: dict[str, object] = {
        **connection(settings, principal),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        # Prefetch about one chunk per partition: a bigger record still comes (Kafka returns at
        # least one batch whatever the limit), but six partitions' worth of 65 MiB buffers would
        # be the largest thing in a worker's memory.
        "max_partition_fetch_bytes": settings.max_chunk_bytes + MIB,
        "fetch_max_bytes": 4 * (settings.max_chunk_bytes + MIB),
        # A read_committed fetch that is parked waiting for data is not woken when a transaction
        # commits; a short wait bounds how long a committed event sits unseen.
        "fetch_max_wait_ms": 20,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 1_000,
        "max_poll_interval_ms": 300_000,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def upload_worker_group(settings: Settings) -> str:
    """The upload worker's consumer group; the query service reads its committed offsets."""
    # Named after the topic too: stacks on other topics (test runs, a second tenant) then form
    # groups of their own instead of rebalancing this one every time they start or stop.
    return f"layerlog-upload-worker.{settings.commands_topic}"


def verifier_group(settings: Settings) -> str:
    # Named after the topic too, for the same reason as the upload worker's group.
    return f"layerlog-verifier.{settings.events_topic}"


def transactional_id_prefix(service: str, input_topic: str) -> str:
    """What every transactional id of `service` reading `input_topic` starts with (its ACL)."""
    return f"layerlog-{service}-{input_topic}-"


def transactional_id(service: str, input_topic: str, partition: int) -> str:
    """One per input partition: a replica that takes a partition over fences the last owner."""
    return f"{transactional_id_prefix(service, input_topic)}{partition}"


def gc_transactional_id(settings: Settings) -> str:
    """The garbage collector's one transactional id: a sweeper that starts fences the one
    before it, whose reclaims then never commit (and whose deletes never start)."""
    return f"{transactional_id_prefix('gc', settings.events_topic)}sweeper"


def admin(settings: Settings, principal: Principal, **overrides: object) -> AIOKafkaAdminClient:
    options: dict[str, object] = {
        **connection(settings, principal),
        "request_timeout_ms": 10_000,
    }
    options.update(overrides)
    return AIOKafkaAdminClient(**options)


async def describe_partitions(client: AIOKafkaAdminClient, topic: str) -> list[int]:
    """The topic's partition numbers, from a fresh metadata request; LookupError if the topic
    does not exist (or has no partitions yet), TopicAuthorizationFailedError if the principal
    may not see it (Kafka does not say whether it exists then)."""
    for described in await client.describe_topics([topic]):
        if described["topic"] != topic:
            continue
        if described["error_code"] == TopicAuthorizationFailedError.errno:
            raise TopicAuthorizationFailedError(topic)
        if described["error_code"] == 0:
            found = sorted(p["partition"] for p in described["partitions"])
            if found:
                return found
    raise LookupError(f"topic {topic} does not exist")


async def topic_partitions(settings: Settings, principal: Principal, topic: str) -> list[int]:
    """describe_partitions through an admin client of its own, for one-off readers."""
    client = admin(settings, principal)
    await client.start()
    try:
        return await describe_partitions(client, topic)
    finally:
        await client.close()


# A cluster keeps this many copies of each partition unless told otherwise (and fewer only when
# it has fewer brokers): one broker may be lost, and one more be down for maintenance, without
# losing a record.
DEFAULT_REPLICATION_FACTOR = 3


def min_in_sync(replication_factor: int) -> int:
    """How many copies of a partition must have a record before Kafka acknowledges it (with the
    producers' acks=all): a majority, so an acknowledged record survives the loss of any
    minority of the copies, and writes go on while a minority is down."""
    return replication_factor // 2 + 1


def topic_specs(settings: Settings, replication_factor: int = 1) -> list[NewTopic]:
    big_records = {"max.message.bytes": str(MAX_RECORD_BYTES)}
    # One copy keeps the broker's own setting (1); a replicated topic says what it needs itself
    # rather than trusting the brokers' default.
    durable = {}
    if replication_factor > 1:
        durable = {"min.insync.replicas": str(min_in_sync(replication_factor))}
    return [
        # Commands carry chunk bytes; they are input, kept long enough to replay a crash.
        NewTopic(
            settings.commands_topic,
            settings.partitions,
            replication_factor,
            # The broker stamps each command: the upload worker judges a token's expiry by
            # that time, which a client cannot choose and a replay sees again.
            topic_configs={
                **big_records,
                **durable,
                "retention.ms": str(COMMAND_RETENTION_MS),
                "message.timestamp.type": "LogAppendTime",
            },
        ),
        # The events topic is the audit log and the source of truth: never deleted. It carries
        # manifests (ManifestStored has the bytes, up to 4 MiB), so its records are big too.
        NewTopic(
            settings.events_topic,
            settings.partitions,
            replication_factor,
            topic_configs={
                **big_records,
                **durable,
                "retention.ms": "-1",
                "retention.bytes": "-1",
            },
        ),
        NewTopic(
            settings.dead_letter_topic,
            settings.partitions,
            replication_factor,
            topic_configs={**big_records, **durable, "retention.ms": "-1"},
        ),
    ]


@dataclass(frozen=True)
class Topics:
    """What ensure_topics did: the topics it created, with how many copies, and the topics that
    were there already with fewer copies than that (name: their replication factor)."""

    created: list[str]
    replication_factor: int
    short: dict[str, int]


async def ensure_topics(settings: Settings, timeout: float = 60.0) -> Topics:
    """Creates the topics the services need, replicated as the settings and the cluster say."""
    admin = AIOKafkaAdminClient(**connection(settings, Principal.ADMIN), request_timeout_ms=10_000)
    await _retry_until(admin.start, timeout, "Kafka at " + settings.kafka_bootstrap)
    created = []
    short = {}
    try:
        replicas = await _replication_factor(admin, settings, timeout)
        existing = set(await admin.list_topics())
        for spec in topic_specs(settings, replicas):
            if spec.name in existing:
                await _raise_record_limit(admin, spec)
                copies = await _replicas_of(admin, spec.name)
                if copies < replicas:
                    short[spec.name] = copies
                continue
            try:
                await admin.create_topics([spec])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    return Topics(created, replicas, short)


async def _replication_factor(
    admin: AIOKafkaAdminClient, settings: Settings, timeout: float
) -> int:
    """LAYERLOG_KAFKA_REPLICATION_FACTOR, once the cluster has a broker for each copy (brokers
    of a cluster that is starting register one by one); 0 there: min(3, the brokers now)."""
    wanted = settings.kafka_replication_factor
    deadline = time.monotonic() + timeout
    while True:
        brokers = sorted(b["node_id"] for b in (await admin.describe_cluster())["brokers"])
        if not wanted:
            return max(1, min(DEFAULT_REPLICATION_FACTOR, len(brokers)))
        if len(brokers) >= wanted:
            return wanted
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"LAYERLOG_KAFKA_REPLICATION_FACTOR is {wanted}, but the Kafka cluster at "
                f"{settings.kafka_bootstrap} has {len(brokers)} broker(s) up (ids "
                f"{', '.join(map(str, brokers)) or 'none'}) after {timeout:.0f}s: each copy of "
                f"a partition needs a broker of its own. Start the others, or set it to at most "
                f"{len(brokers)} (0 takes min(3, the brokers there are))"
            )
        await asyncio.sleep(0.5)


async def _replicas_of(admin: AIOKafkaAdminClient, topic: str) -> int:
    """The fewest copies any partition of the topic has."""
    for described in await admin.describe_topics([topic]):
        if described["topic"] == topic and described["partitions"]:
            return min(len(p["replicas"]) for p in described["partitions"])
    return 0


async def _raise_record_limit(admin: AIOKafkaAdminClient, spec: NewTopic) -> None:
    """Gives a topic made by an older Layerlog the record size its spec now asks for.

    Events topics provisioned before manifests existed kept Kafka's 1 MiB default, which a large
    manifest's ManifestStored exceeds. AlterConfigs replaces a topic's whole dynamic config, so
    it is only sent when the limit is short, with the spec's configs.
    """
    wanted = spec.topic_configs.get("max.message.bytes")
    stamp = spec.topic_configs.get("message.timestamp.type")
    if wanted is None:
        return
    names = {"max.message.bytes": None, "message.timestamp.type": None}
    resource = ConfigResource(ConfigResourceType.TOPIC, spec.name, names)
    (response,) = await admin.describe_configs([resource])
    current = {entry[0]: entry[1] for entry in response.resources[0][4]}
    short = int(current.get("max.message.bytes") or 0) < int(wanted)
    # Commands topics made before logins were stamped by their producers (CreateTime).
    restamp = stamp is not None and current.get("message.timestamp.type") != stamp
    if not short and not restamp:
        return
    log.warning(
        "topic %s has configs %s; setting them to %s", spec.name, current, spec.topic_configs
    )
    await admin.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, spec.name, dict(spec.topic_configs))]
    )


async def _retry_until(start: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await start()  # type: ignore[operator]
            return
        except (KafkaError, OSError) as error:
            if refused(error):
                raise RuntimeError(f"{what} refused the admin principal: {error!r}") from error
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} did not answer within {timeout:.0f}s: {error}"
                ) from error
            await asyncio.sleep(0.5)


async def warm_up(settings: Settings, timeout: float = 120.0) -> None:
    """Makes Kafka create its internal topics now rather than under the first upload.

    A fresh broker creates __consumer_offsets when the first group commits and
    __transaction_state when the first transactional producer starts; either can take many
    seconds, which the first upload would otherwise spend waiting.
    """
    admin = AIOKafkaAdminClient(**connection(settings, Principal.ADMIN))
    await _retry_until(admin.start, timeout, "Kafka at " + settings.kafka_bootstrap)
    try:
        internal = {"__consumer_offsets", "__transaction_state"} & set(await admin.list_topics())
    finally:
        await admin.close()
    if len(internal) == 2:
        return  # warmed up before: nothing to wait for
    kafka_consumer = consumer(settings, Principal.ADMIN, [], "layerlog-provision")
    await _retry_until(kafka_consumer.start, timeout, "Kafka's group coordinator")
    try:
        tp = TopicPartition(settings.events_topic, 0)
        kafka_consumer.assign([tp])
        deadline = time.monotonic() + timeout
        while True:
            try:
                await kafka_consumer.commit({tp: OffsetAndMetadata(0, "")})
                break
            except KafkaError as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Kafka's group coordinator is not ready: {error}"
                    ) from error
                await asyncio.sleep(0.5)
    finally:
        await kafka_consumer.stop()
    transactional = producer(settings, Principal.ADMIN, transactional_id="layerlog-provision")
    await _retry_until(transactional.start, timeout, "Kafka's transaction coordinator")
    await transactional.stop()
