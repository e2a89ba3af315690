"""`deploy/stack up --brokers 3` is what it says: three nodes, every topic (Layerlog's and Kafka's
internal ones) in three copies with two in sync for a write to count, and the same logins and
ACLs as the single node on every one of them."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from services.core import kafka
from services.core.login import login_problem
from services.core.principals import Principal
from services.core.settings import Settings
from tests.cluster.brokers import BROKERS, Cluster, partitions
from tests.test_kafka_security import forge, produce, read_back

# What `deploy/stack up` provisions, and the topics Kafka makes for groups and transactions.
TOPICS = ("layerlog.commands", "layerlog.events", "layerlog.dead-letter")
INTERNAL = ("__consumer_offsets", "__transaction_state")


async def topic_config(settings: Settings, topic: str, name: str) -> str:
    client = kafka.admin(settings, Principal.ADMIN)
    await client.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, {name: None})
        (response,) = await client.describe_configs([resource])
        return {entry[0]: entry[1] for entry in response.resources[0][4]}[name]
    finally:
        await client.close()


async def broker_configs(settings: Settings, node: int, names: list[str]) -> dict[str, str]:
    client = kafka.admin(settings, Principal.ADMIN)
    await client.start()
    try:
        resource = ConfigResource(ConfigResourceType.BROKER, str(node), dict.fromkeys(names))
        (response,) = await client.describe_configs([resource])
        return {entry[0]: entry[1] for entry in response.resources[0][4]}
    finally:
        await client.close()


def one_node(settings: Settings, cluster: Cluster, node: int) -> Settings:
    return replace(settings, kafka_bootstrap=f"127.0.0.1:{cluster.port(node)}")


async def test_every_topic_has_three_copies_on_three_brokers(cluster_settings: Settings):
    states = await partitions(cluster_settings, [*TOPICS, *INTERNAL])
    for topic in (*TOPICS, *INTERNAL):
        of_topic = [state for (name, _), state in states.items() if name == topic]
        assert of_topic, f"{topic} does not exist"
        for state in of_topic:
            assert sorted(state.replicas) == list(range(1, BROKERS + 1)), (topic, state)
            assert state.in_sync, (topic, state)
    for topic in TOPICS:
        assert await topic_config(cluster_settings, topic, "min.insync.replicas") == "2"


async def test_each_broker_keeps_kafka_s_own_state_in_three_copies(cluster_settings: Settings):
    wanted = {
        "offsets.topic.replication.factor": "3",
        "transaction.state.log.replication.factor": "3",
        "transaction.state.log.min.isr": "2",
        "min.insync.replicas": "2",
        "default.replication.factor": "3",
    }
    for node in range(1, BROKERS + 1):
        assert await broker_configs(cluster_settings, node, list(wanted)) == wanted, node


@pytest.mark.parametrize("node", range(1, BROKERS + 1))
async def test_every_node_holds_the_single_node_s_logins_and_acls(
    cluster: Cluster, cluster_settings: Settings, node: int, tmp_path
):
    only = one_node(cluster_settings, cluster, node)
    # Through this node alone: the client may put commands on the log, and not forge events.
    where = await produce(only, Principal.CLIENT, "layerlog.commands", b"a command, node %d" % node)
    assert await read_back(only, Principal.UPLOAD_WORKER, where) == b"a command, node %d" % node
    with pytest.raises(TopicAuthorizationFailedError):
        await forge(only, Principal.CLIENT, "layerlog.events")
    # A wrong password is refused with the reason; PLAINTEXT gets nowhere.
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    bad = replace(only, kafka_sasl_password_file=str(wrong))
    problem = await login_problem(bad, Principal.CLIENT)
    assert problem is not None and "invalid credentials" in str(problem)
    plaintext = AIOKafkaProducer(
        bootstrap_servers=only.kafka_bootstrap,
        security_protocol="PLAINTEXT",
        request_timeout_ms=5000,
    )
    with pytest.raises(KafkaError):
        await asyncio.wait_for(plaintext.start(), 30)
    await plaintext.stop()


async def test_provisioning_asks_for_as_many_brokers_as_copies(cluster_settings: Settings):
    """Five copies on three brokers cannot be: provisioning says which setting asks for it."""
    asking = replace(cluster_settings, kafka_replication_factor=5, commands_topic="never-made")
    with pytest.raises(RuntimeError, match=r"LAYERLOG_KAFKA_REPLICATION_FACTOR is 5.* 3 broker"):
        await kafka.ensure_topics(asking, timeout=1)
