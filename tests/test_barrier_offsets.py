"""The read barrier's reading of the upload worker group's committed offsets (pure logic)."""

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from services.query.barrier import committed_offsets

TOPIC = "layerlog.commands"


def answer(offsets: dict[int, int], topic: str = TOPIC) -> dict[TopicPartition, OffsetAndMetadata]:
    return {TopicPartition(topic, p): OffsetAndMetadata(o, "") for p, o in offsets.items()}


def test_every_asked_partition_answered_gives_its_offset_and_nothing_committed_is_zero() -> None:
    assert committed_offsets(TOPIC, [0, 1, 2], answer({0: 7, 1: -1, 2: 0})) == {0: 7, 1: 0, 2: 0}


def test_an_answer_without_the_partitions_asked_for_is_no_answer() -> None:
    # What aiokafka returns for an OffsetFetch refused as a whole (the coordinator moved): had it
    # been read as offset 0, the barrier would have waited out every request after a failover.
    assert committed_offsets(TOPIC, [0, 1], {}) is None
    assert committed_offsets(TOPIC, [0, 1], answer({0: 5})) is None


def test_offsets_of_another_topic_do_not_count() -> None:
    assert committed_offsets(TOPIC, [0], answer({0: 5}, topic="other")) is None
