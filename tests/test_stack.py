"""The real stack answers as the services need: Kafka with idempotence and transactions, S3 with
ranged reads and multipart uploads."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.core.codec import CODEC
from services.core.kafka import MAX_RECORD_BYTES, connection, ensure_topics, topic_specs
from services.core.objectstore import ObjectNotFound, ObjectStore
from services.core.principals import Principal
from services.core.records import StartUpload
from services.core.settings import S3_MIN_PART_SIZE, Settings


@pytest.fixture()
async def fresh_topic(settings: Settings):
    name = f"test-stack-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**connection(settings, Principal.ADMIN))
    await admin.start()
    await admin.create_topics([NewTopic(name, 1, 1)])
    yield name
    await admin.delete_topics([name])
    await admin.close()


async def read_all(settings: Settings, topic: str, isolation: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        **connection(settings, Principal.ADMIN),
        isolation_level=isolation,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            values += [record.value for record in batch.get(tp, [])]
            if not batch and isolation == "read_committed":
                break
        return values
    finally:
        await consumer.stop()


async def test_idempotent_producer_round_trips_an_avro_record(settings, fresh_topic):
    command = StartUpload(upload_id=str(uuid.uuid4()), repository="library/ubuntu")
    producer = AIOKafkaProducer(
        **connection(settings, Principal.ADMIN), enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        metadata = await producer.send_and_wait(
            fresh_topic, CODEC.encode(command), key=command.upload_id.encode()
        )
    finally:
        await producer.stop()
    assert metadata.offset == 0
    values = await read_all(settings, fresh_topic, "read_uncommitted")
    # Read back as written: with the newest schema of its type, which it says it was.
    written = replace(command, schema_version=CODEC.newest["StartUpload"].version)
    assert [CODEC.decode(v) for v in values] == [written]


async def test_transactions_commit_visible_abort_invisible(settings, fresh_topic):
    producer = AIOKafkaProducer(
        **connection(settings, Principal.ADMIN), transactional_id=f"test-{fresh_topic}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(fresh_topic, b"committed")
        await producer.begin_transaction()
        await producer.send(fresh_topic, b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(fresh_topic, b"after")
    finally:
        await producer.stop()
    assert await read_all(settings, fresh_topic, "read_committed") == [b"committed", b"after"]
    uncommitted = await read_all(settings, fresh_topic, "read_uncommitted")
    assert b"aborted" in uncommitted


async def test_object_put_stat_ranged_get_delete(store: ObjectStore):
    key = f"stack-test/{uuid.uuid4()}"
    data = os.urandom(100_000)
    await store.put(key, data, metadata={"purpose": "test"})
    info = await store.stat(key)
    assert info.size == len(data)
    assert info.metadata.get("purpose") == "test"
    assert await store.get(key, offset=1000, length=500) == data[1000:1500]
    assert (
        b"".join([c async for c in store.stream(key, 99_000, 0, chunk_size=300)]) == data[99_000:]
    )
    await store.delete(key)
    with pytest.raises(ObjectNotFound):
        await store.stat(key)


async def test_multipart_upload_with_5_mib_parts(store: ObjectStore):
    key = f"stack-test/{uuid.uuid4()}/data"
    parts_data = [os.urandom(S3_MIN_PART_SIZE), os.urandom(S3_MIN_PART_SIZE), b"short tail"]
    upload_id = await store.start_multipart(key)
    assert (key, upload_id) in await store.multipart_uploads(key)
    parts = [
        await store.put_part(key, upload_id, number, data)
        for number, data in enumerate(parts_data, start=1)
    ]
    await store.complete_multipart(key, upload_id, parts)
    assert (await store.stat(key)).size == sum(map(len, parts_data))
    boundary = S3_MIN_PART_SIZE - 10
    assert await store.get(key, boundary, 20) == parts_data[0][-10:] + parts_data[1][:10]
    assert await store.multipart_uploads(key) == []
    await store.delete(key)


async def test_aborted_multipart_upload_leaves_nothing(store: ObjectStore):
    key = f"stack-test/{uuid.uuid4()}/data"
    upload_id = await store.start_multipart(key)
    await store.put_part(key, upload_id, 1, os.urandom(S3_MIN_PART_SIZE))
    await store.abort_multipart(key, upload_id)
    assert await store.multipart_uploads(key) == []
    with pytest.raises(ObjectNotFound):
        await store.stat(key)


async def test_provision_raises_an_old_events_topic_s_record_limit(settings: Settings):
    """An events topic from before manifests had Kafka's 1 MiB limit: a large manifest's
    ManifestStored would be refused. Provisioning gives it the limit its spec asks for."""
    run = uuid.uuid4().hex[:8]
    own = replace(
        settings,
        commands_topic=f"test-old-{run}.commands",
        events_topic=f"test-old-{run}.events",
        dead_letter_topic=f"test-old-{run}.dead-letter",
    )
    admin = AIOKafkaAdminClient(**connection(settings, Principal.ADMIN))
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(own.events_topic, 1, 1, topic_configs={"retention.ms": "-1"})]
        )
        await ensure_topics(own)
        resource = ConfigResource(ConfigResourceType.TOPIC, own.events_topic, None)
        (response,) = await admin.describe_configs([resource])
        configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
        assert int(configs["max.message.bytes"]) == MAX_RECORD_BYTES
        assert configs["retention.ms"] == "-1" and configs["retention.bytes"] == "-1"
    finally:
        await admin.delete_topics([own.commands_topic, own.events_topic, own.dead_letter_topic])
        await admin.close()


def test_replicated_topics_ask_for_a_majority_in_sync_and_one_copy_keeps_the_broker_s_setting():
    settings = Settings()
    for copies, in_sync in ((1, None), (2, "2"), (3, "2"), (5, "3")):
        for spec in topic_specs(settings, copies):
            assert spec.replication_factor == copies
            assert spec.topic_configs.get("min.insync.replicas") == in_sync, (copies, spec.name)


async def test_provision_refuses_more_copies_than_brokers_naming_the_setting(settings: Settings):
    """N brokers cannot hold N + 1 copies: provisioning waits for more brokers a moment, then
    says which setting asks for them, instead of Kafka's INVALID_REPLICATION_FACTOR."""
    admin = AIOKafkaAdminClient(**connection(settings, Principal.ADMIN))
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
    finally:
        await admin.close()
    too_many = replace(
        settings, kafka_replication_factor=brokers + 1, commands_topic="test-never-made"
    )
    pattern = rf"LAYERLOG_KAFKA_REPLICATION_FACTOR is {brokers + 1}.* {brokers} broker"
    with pytest.raises(RuntimeError, match=pattern):
        await ensure_topics(too_many, timeout=1)
    # The session's topics exist already: asking again creates nothing.
    assert (await ensure_topics(settings)).created == []
