"""Creates what the services need on a fresh stack: the topics, their ACLs and the bucket.

`deploy/stack up` runs this once the servers answer; running it again changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from services.core import access, acls
from services.core.kafka import admin, ensure_topics, warm_up
from services.core.objectstore import ObjectStore
from services.core.principals import Principal
from services.core.settings import Settings

STALE_MULTIPART_DAYS = 7


async def provision(settings: Settings, timeout: float = 60.0) -> list[str]:
    """Returns a line for each thing it did, for the operator."""
    report = []
    topics = await ensure_topics(settings, timeout)
    copies = "" if topics.replication_factor == 1 else f" ({topics.replication_factor} copies)"
    report += [f"created topic {name}{copies}" for name in topics.created]
    report += [
        f"note: topic {name} has {replicas} copies of its partitions, fewer than the "
        f"{topics.replication_factor} asked for; Layerlog does not move partitions "
        "(kafka-reassign-partitions does)"
        for name, replicas in sorted(topics.short.items())
    ]
    if settings.kafka_security_protocol == "PLAINTEXT":
        # Nobody logs in, so there is no principal to grant anything to.
        report.append("note: Kafka over PLAINTEXT: no logins, so no ACLs granted")
    elif granted := await acls.grant(settings, access.bindings(settings), timeout):
        report.append(f"granted {granted} Kafka ACLs on them")
    await warm_up(settings, timeout)
    store = ObjectStore(settings)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await store.ensure_bucket():
                report.append(f"created bucket {settings.bucket}")
            break
        except Exception as error:  # the server is still starting: any failure means retry
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"S3 at {settings.s3_endpoint} did not answer within {timeout:.0f}s: {error}"
                ) from error
            await asyncio.sleep(0.5)
    if settings.s3_reader is not None and not await store.grant_reader():
        report.append(
            "note: the S3 server takes no bucket policy; blob redirects are signed with the "
            "services' key (set LAYERLOG_S3_READ_ACCESS_KEY=none to say so and drop this note)"
        )
    if not await store.abort_stale_multipart_uploads_after(STALE_MULTIPART_DAYS):
        report.append(
            "note: the S3 server has no lifecycle rules; stale multipart uploads are "
            "removed by Layerlog's own upload expiry"
        )
    return report


async def remove_topics(settings: Settings) -> None:
    """The reverse of the Kafka half of provision, for runs with topics of their own (the tests,
    the bench): deletes the settings' topics and revokes the ACLs granted on them."""
    client = admin(settings, Principal.ADMIN)
    await client.start()
    try:
        names = [settings.commands_topic, settings.events_topic, settings.dead_letter_topic]
        existing = set(await client.list_topics())
        if doomed := [name for name in names if name in existing]:
            await client.delete_topics(doomed)
    finally:
        await client.close()
    if settings.kafka_security_protocol != "PLAINTEXT":
        await acls.revoke(settings, access.bindings(settings))


def main() -> int:
    # aiokafka logs each coordinator it finds not ready yet (a cluster's internal topics take a
    # moment to get their replicas); provisioning retries those and says itself what failed.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        for line in asyncio.run(provision(Settings.from_env())):
            print(line)
    except Exception as error:
        print(f"provision: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
