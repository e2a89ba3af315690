"""Distribution's token scopes, `repository:NAME:pull,push`, and what a token grants."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    PULL = "pull"
    PUSH = "push"
    DELETE = "delete"
    # In a scope or a grant: every action on the resource (Distribution's `registry:catalog:*`).
    ALL = "*"


REPOSITORY = "repository"
REGISTRY = "registry"
CATALOG = "catalog"
_KNOWN_ACTIONS = frozenset(Action)


class ScopeInvalid(ValueError):
    pass


@dataclass(frozen=True)
class Access:
    """One resource and the actions on it: an entry of a scope, or of a token's access claim."""

    type: str
    name: str
    actions: frozenset[str]

    def scope(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"

    def claim(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name, "actions": sorted(self.actions)}

    def covers(self, action: str) -> bool:
        return action in self.actions or Action.ALL in self.actions


def repository(name: str, *actions: str) -> Access:
    return Access(REPOSITORY, name, frozenset(actions))


CATALOG_ACCESS = Access(REGISTRY, CATALOG, frozenset({Action.ALL}))


def parse_scopes(texts: Iterable[str]) -> list[Access]:
    """Each `type:name:actions` (several per text, space-separated, as docker sends them).

    The name is what lies between the first and the last colon, so a name with a port in it
    (`repository:host:5000/app:pull`) still parses; the registry then refuses the name.
    """
    found: list[Access] = []
    for text in texts:
        for scope in text.split():
            kind, sep, rest = scope.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if not sep or not sep2 or not kind or not name:
                raise ScopeInvalid(f"a scope is type:name:actions, got {scope[:200]!r}")
            wanted = frozenset(a for a in actions.split(",") if a)
            found.append(Access(kind, name, wanted & _KNOWN_ACTIONS))
    return found


@dataclass(frozen=True)
class Grant:
    """What one authenticated caller may do: the subject and its access entries."""

    subject: str
    access: tuple[Access, ...]
    token: str | None = None  # the bearer token it came from, which commands carry on
    issuer: str | None = None
    expires: float | None = None  # the token's exp, in seconds since the epoch

    def allows(self, wanted: Access) -> bool:
        return all(self.allows_action(wanted.type, wanted.name, a) for a in wanted.actions)

    def allows_action(self, kind: str, name: str, action: str) -> bool:
        return any(a.type == kind and a.name == name and a.covers(action) for a in self.access)

    def repositories(self, action: str) -> list[str]:
        """The repositories the grant names with this action (for discovery across them)."""
        return [a.name for a in self.access if a.type == REPOSITORY and a.covers(action)]
