"""What each Kafka principal may do, as ACLs on one deployment's topics, groups and
transactional ids.

Topics and groups are named exactly (LITERAL): a principal allowed on these topics is allowed on
no other, whatever its name. Transactional ids are one per input partition, so a worker's are
granted by their prefix, which names the worker and its input topic.
`layerlog provision` (and `deploy/stack up`) grants them, and so do the tests for the topics of
their own.

Kafka counts READ and WRITE as DESCRIBE too; DESCRIBE alone lets a principal look a topic's
partitions and end offsets up, or a group's committed offsets, and nothing else.
"""

from __future__ import annotations

from services.core import kafka
from services.core.acls import AclBinding, Operation, PatternType, ResourceType
from services.core.principals import Principal
from services.core.settings import Settings

READ, WRITE, DESCRIBE = Operation.READ, Operation.WRITE, Operation.DESCRIBE


def bindings(settings: Settings) -> list[AclBinding]:
    commands, events = settings.commands_topic, settings.events_topic
    dead_letters = settings.dead_letter_topic
    worker_group = kafka.upload_worker_group(settings)
    verifier_group = kafka.verifier_group(settings)

    def topic(principal: Principal, name: str, *operations: Operation) -> list[AclBinding]:
        return [_literal(principal, ResourceType.TOPIC, name, op) for op in operations]

    def group(principal: Principal, name: str, operation: Operation) -> list[AclBinding]:
        return [_literal(principal, ResourceType.GROUP, name, operation)]

    def transactions(principal: Principal, service: str, input_topic: str) -> list[AclBinding]:
        prefix = kafka.transactional_id_prefix(service, input_topic)
        return [
            AclBinding(
                principal, ResourceType.TRANSACTIONAL_ID, prefix, PatternType.PREFIXED, WRITE
            )
        ]

    return [
        # Commands only; its projection reads events, and its read barrier looks up the commands'
        # end offsets and what the upload worker's group has committed.
        *topic(Principal.REGISTRY, commands, WRITE),
        *topic(Principal.REGISTRY, events, READ),
        *group(Principal.REGISTRY, worker_group, DESCRIBE),
        # The same reads as the registry's, no writes.
        *topic(Principal.QUERY, events, READ),
        *topic(Principal.QUERY, commands, DESCRIBE),
        *group(Principal.QUERY, worker_group, DESCRIBE),
        # Commands in its group; events and dead letters in its transactions; ExpireUpload
        # commands, which it sends itself.
        *topic(Principal.UPLOAD_WORKER, commands, READ, WRITE),
        *topic(Principal.UPLOAD_WORKER, events, WRITE),
        *topic(Principal.UPLOAD_WORKER, dead_letters, WRITE),
        *group(Principal.UPLOAD_WORKER, worker_group, READ),
        *transactions(Principal.UPLOAD_WORKER, "upload-worker", commands),
        # Events in its group, verdicts back onto events, dead letters.
        *topic(Principal.VERIFIER, events, READ, WRITE),
        *topic(Principal.VERIFIER, dead_letters, WRITE),
        *group(Principal.VERIFIER, verifier_group, READ),
        *transactions(Principal.VERIFIER, "verifier", events),
        # Upload commands; everything else the SDK does goes through the query service.
        *topic(Principal.CLIENT, commands, WRITE),
        # The garbage collector: events for its own index, its reclaims back onto events in
        # transactions of its own (one id: one sweeper at a time publishes).
        *topic(Principal.GC, events, READ, WRITE),
        *transactions(Principal.GC, "gc", events),
        # Every topic, read only.
        *topic(Principal.AUDITOR, commands, READ),
        *topic(Principal.AUDITOR, events, READ),
        *topic(Principal.AUDITOR, dead_letters, READ),
    ]


def _literal(
    principal: Principal, resource: ResourceType, name: str, operation: Operation
) -> AclBinding:
    return AclBinding(principal, resource, name, PatternType.LITERAL, operation)
