"""Kafka ACLs: the one place that sends CreateAcls, DescribeAcls and DeleteAcls.

aiokafka 0.14's admin client has no ACL calls. Its client class (aiokafka.AIOKafkaClient, in
the package's __all__) sends any request, and aiokafka.protocol.admin defines these three, but
neither is documented as a stable interface: this module is the seam. aiokafka is pinned to
0.14.x in pyproject.toml, and tests/test_kafka_security.py grants, reads back and revokes ACLs
through it on the real broker.

Bindings always allow (Kafka's ACLs can deny too; Layerlog grants, and denies by default).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from aiokafka import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest, DescribeAclsRequest

from services.core import kafka
from services.core.principals import Principal
from services.core.settings import Settings

# The protocol's numbers for these (Kafka's ResourceType, PatternType, AclOperation and
# AclPermissionType).
ANY = 1
ALLOW = 3
ANY_HOST = "*"


class ResourceType(IntEnum):
    TOPIC = 2
    GROUP = 3
    TRANSACTIONAL_ID = 5


class PatternType(IntEnum):
    LITERAL = 3
    PREFIXED = 4


class Operation(IntEnum):
    READ = 3
    WRITE = 4
    DESCRIBE = 8


_RESOURCES = {member.value for member in ResourceType}
_OPERATIONS = {member.value for member in Operation}


class AclError(Exception):
    """Kafka did not take an ACL change (the admin principal may lack the right to)."""


@dataclass(frozen=True, order=True)
class AclBinding:
    """`principal` may do `operation` on the resource, from any host."""

    principal: str  # the bare user name; Kafka's form is User:NAME
    resource: ResourceType
    name: str
    pattern: PatternType
    operation: Operation

    @property
    def kafka_principal(self) -> str:
        return f"User:{self.principal}"


async def grant(settings: Settings, bindings: Iterable[AclBinding], timeout: float = 30) -> int:
    """Creates the bindings Kafka does not have yet; returns how many it created. Returns once
    every broker enforces them all, so a client started right after is let in wherever it
    connects: each broker learns of new ACLs from the metadata log in its own time, and answers
    DescribeAcls from what it enforces."""
    wanted = set(bindings)
    async with _Admin(settings) as admin:
        missing = wanted - await admin.describe(wanted)
        await asyncio.gather(*(admin.create(binding) for binding in sorted(missing)))
        deadline = time.monotonic() + timeout
        for node in admin.brokers():
            while missing - await admin.describe(missing, node):
                if time.monotonic() > deadline:
                    raise AclError(
                        f"Kafka took the ACLs but broker {node} does not show them after "
                        f"{timeout:.0f}s"
                    )
                await asyncio.sleep(0.05)
    return len(missing)


async def revoke(settings: Settings, bindings: Iterable[AclBinding]) -> None:
    """Deletes exactly these bindings (those Kafka does not have are no error)."""
    async with _Admin(settings) as admin:
        await asyncio.gather(*(admin.delete(binding) for binding in sorted(set(bindings))))


async def granted(settings: Settings, bindings: Iterable[AclBinding]) -> set[AclBinding]:
    """Every allowing binding Kafka has on the resources the given bindings name."""
    async with _Admin(settings) as admin:
        return await admin.describe(set(bindings))


class _Admin:
    """An aiokafka client logged in as the admin principal, sending the three ACL requests."""

    def __init__(self, settings: Settings) -> None:
        self.client = AIOKafkaClient(
            **kafka.connection(settings, Principal.ADMIN), request_timeout_ms=10_000
        )

    async def __aenter__(self) -> _Admin:
        await self.client.bootstrap()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.close()

    async def create(self, binding: AclBinding) -> None:
        response = await self._send(CreateAclsRequest(*_wire(binding)))
        for error_code, message in response.creation_responses:
            _check(error_code, message, f"granting {binding}")

    async def delete(self, binding: AclBinding) -> None:
        response = await self._send(DeleteAclsRequest(*_wire(binding)))
        for error_code, message, _matching in response.filter_responses:
            _check(error_code, message, f"revoking {binding}")

    def brokers(self) -> list[int]:
        """The node ids of the brokers the cluster's metadata lists."""
        return sorted(broker.nodeId for broker in self.client.cluster.brokers())

    async def describe(self, bindings: set[AclBinding], node: int | None = None) -> set[AclBinding]:
        """The bindings on these resources that a broker (node, else any) enforces."""
        resources = {(b.resource, b.name, b.pattern) for b in bindings}
        found: set[AclBinding] = set()
        for response in await asyncio.gather(
            *(
                self._send(DescribeAclsRequest(resource, name, pattern, None, None, ANY, ANY), node)
                for resource, name, pattern in sorted(resources)
            )
        ):
            _check(response.error_code, response.error_message, "reading ACLs")
            for resource, name, pattern, acls in response.resources:
                for principal, host, operation, permission in acls:
                    user = principal.removeprefix("User:")
                    known = operation in _OPERATIONS and resource in _RESOURCES
                    if not known or permission != ALLOW or host != ANY_HOST or user == principal:
                        continue  # not a kind of binding Layerlog makes
                    found.add(
                        AclBinding(
                            user,
                            ResourceType(resource),
                            name,
                            PatternType(pattern),
                            Operation(operation),
                        )
                    )
        return found

    async def _send(self, request: object, node: int | None = None) -> object:
        if node is None:
            node = self.client.get_random_node()
        return await self.client.send(node, request)


def _wire(binding: AclBinding) -> tuple[int, str, int, str, str, int, int]:
    return (
        binding.resource,
        binding.name,
        binding.pattern,
        binding.kafka_principal,
        ANY_HOST,
        binding.operation,
        ALLOW,
    )


def _check(error_code: int, message: str | None, doing: str) -> None:
    if error_code != 0:
        error = for_code(error_code)
        raise AclError(f"Kafka refused {doing}: {error.__name__}: {message or error.description}")
