"""The repository policy: which users and groups may pull, push or delete where. Deny by default.

A TOML file (LAYERLOG_AUTH_POLICY_FILE):

    admins = ["admin"]                     # every action everywhere, and the catalog

    [groups]
    builders = ["ci-bot", "alice"]

    [repositories."library/*"]
    anonymous = ["pull"]                   # anyone, logged in or not
    authenticated = ["pull"]               # any user who logged in
    "group:builders" = ["pull", "push"]

    [repositories."team-a/**"]
    alice = ["pull", "push", "delete"]

In a pattern `*` matches within one path component and `**` across components. Of the patterns
that match a repository, the longest wins, and only its entries count: a narrower pattern can
take rights away as well as give them. The file is read again whenever it changes.
"""

from __future__ import annotations

import re
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from services.auth.errors import AuthSetupError
from services.auth.scopes import Action

ANONYMOUS = "anonymous"
AUTHENTICATED = "authenticated"
_GROUP = "group:"
_ACTIONS = frozenset({Action.PULL, Action.PUSH, Action.DELETE})
_PATTERN = re.compile(r"^[a-z0-9*][a-z0-9._/*-]*$")


class PolicyInvalid(AuthSetupError):
    pass


@dataclass(frozen=True)
class Rule:
    pattern: str
    matcher: re.Pattern[str]
    entries: dict[str, frozenset[str]]


def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(
        ".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part) for part in parts
    )
    return re.compile(f"^{regex}$")


@dataclass(frozen=True)
class PolicyRules:
    admins: frozenset[str] = frozenset()
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    def actions(self, subject: str | None, repository: str) -> frozenset[str]:
        """What subject (None: anonymous) may do in repository."""
        if subject is not None and subject in self.admins:
            return _ACTIONS
        matching = [rule for rule in self.rules if rule.matcher.match(repository)]
        if not matching:
            return frozenset()
        rule = max(matching, key=lambda r: len(r.pattern))
        allowed = set(rule.entries.get(ANONYMOUS, ()))
        if subject is not None:
            allowed |= rule.entries.get(AUTHENTICATED, frozenset())
            allowed |= rule.entries.get(subject, frozenset())
            for group, members in self.groups.items():
                if subject in members:
                    allowed |= rule.entries.get(_GROUP + group, frozenset())
        return frozenset(allowed)

    def is_admin(self, subject: str | None) -> bool:
        return subject is not None and subject in self.admins


def parse_policy(text: str, where: str = "the policy") -> PolicyRules:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as bad:
        raise PolicyInvalid(f"{where} is not valid TOML: {bad}") from None
    unknown = set(data) - {"admins", "groups", "repositories"}
    if unknown:
        raise PolicyInvalid(f"{where}: unknown keys {sorted(unknown)}")
    admins = data.get("admins", [])
    if not isinstance(admins, list) or not all(isinstance(a, str) for a in admins):
        raise PolicyInvalid(f"{where}: admins is a list of user names")
    groups: dict[str, frozenset[str]] = {}
    for name, members in data.get("groups", {}).items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise PolicyInvalid(f"{where}: group {name!r} is a list of user names")
        groups[name] = frozenset(members)
    rules = []
    for pattern, entries in data.get("repositories", {}).items():
        if not _PATTERN.match(pattern) or "***" in pattern:
            raise PolicyInvalid(
                f"{where}: {pattern!r} is not a repository pattern (lowercase name with * and **)"
            )
        if not isinstance(entries, dict):
            raise PolicyInvalid(f"{where}: repositories.{pattern!r} maps users to actions")
        checked: dict[str, frozenset[str]] = {}
        for who, actions in entries.items():
            if not isinstance(actions, list) or not set(actions) <= _ACTIONS:
                raise PolicyInvalid(
                    f"{where}: {pattern!r}.{who!r} must list actions among pull, push, delete"
                )
            if who.startswith(_GROUP) and who[len(_GROUP) :] not in groups:
                raise PolicyInvalid(f"{where}: {pattern!r} names an undefined {who!r}")
            checked[who] = frozenset(actions)
        rules.append(Rule(pattern, _compile(pattern), checked))
    return PolicyRules(frozenset(admins), groups, tuple(rules))


class Policy:
    """The policy file, read again when it changes; a missing file denies everything."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._rules = PolicyRules()

    def current(self) -> PolicyRules:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return PolicyRules()
        stamp = (status.st_mtime_ns, status.st_size)
        with self._lock:
            if stamp != self._stamp:
                # A broken edit raises here, for every request, until it is fixed: the
                # operator sees the error rather than a policy silently kept or dropped.
                self._rules = parse_policy(self.path.read_text(), str(self.path))
                self._stamp = stamp
            return self._rules

    def actions(self, subject: str | None, repository: str) -> frozenset[str]:
        return self.current().actions(subject, repository)
