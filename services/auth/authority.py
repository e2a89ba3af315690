"""The upload worker's check of a command's authority: Kafka records carry no producer
identity, so each command carries the caller's token, and the worker refuses what the token
does not cover (CommandRejected / RepositoryCommandRejected with reason UNAUTHORIZED).

The decision depends only on the record (its token, and the broker's log-append time, which the
commands topic is configured to stamp) and on the configured keys: a batch replayed after a
crash is decided the same way.
"""

from __future__ import annotations

from services.auth.keys import KeyInvalid, load_verifying_keys
from services.auth.scopes import Action, Grant
from services.auth.tokens import TokenRejected, TokenVerifier
from services.core.records import (
    AppendChunk,
    CancelUpload,
    Command,
    DeleteManifest,
    DeleteTag,
    ExpireUpload,
    FinishUpload,
    MountBlob,
    PutManifest,
    RepositoryCommand,
    StartUpload,
    UnlinkBlob,
)
from services.core.settings import Settings

_PUSH = (StartUpload, AppendChunk, FinishUpload, CancelUpload, PutManifest, MountBlob)
_DELETE = (DeleteManifest, DeleteTag, UnlinkBlob)


def needed(command: Command | RepositoryCommand) -> list[tuple[str, str]]:
    """(repository, action) pairs the command's token must cover."""
    if isinstance(command, ExpireUpload):
        return []  # the worker's own; it re-checks the upload's idleness itself
    wanted: list[tuple[str, str]] = []
    if isinstance(command, _PUSH):
        wanted.append((command.repository, Action.PUSH))
    elif isinstance(command, _DELETE):
        wanted.append((command.repository, Action.DELETE))
    else:
        raise TypeError(f"no authority rule for {type(command).__name__}")
    if isinstance(command, MountBlob) and command.source_repository is not None:
        wanted.append((command.source_repository, Action.PULL))
    return wanted


class CommandAuthority:
    def __init__(self, verifier: TokenVerifier | None, grace_seconds: float) -> None:
        self.verifier = verifier  # None: auth is off, every command goes
        self.grace_seconds = grace_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> CommandAuthority:
        if not settings.auth:
            return cls(None, 0)
        try:
            keys = load_verifying_keys(
                settings.auth_keys_dir, settings.auth_issuer, settings.auth_issuers_file or None
            )
        except KeyInvalid as bad:
            raise KeyInvalid(f"the upload worker cannot check commands: {bad}") from None
        if not keys:
            raise KeyInvalid(
                f"LAYERLOG_AUTH is on but {settings.auth_keys_dir} holds no public key (NAME.pub) "
                "to check commands' tokens with; run `layerlog auth init`"
            )
        return cls(TokenVerifier(keys, settings.auth_service), settings.auth_command_grace_seconds)

    def refusal(self, command: Command | RepositoryCommand, appended_at_ms: int) -> str | None:
        """None when the command may be applied; else why not, for the rejection's detail."""
        if self.verifier is None:
            return None
        wanted = needed(command)
        if not wanted:
            return None
        if isinstance(command, MountBlob) and command.source_repository is None:
            return "a mount must name the repository it mounts from"
        token = command.token
        if not token:
            return f"{type(command).__name__} carries no token; log in and send it again"
        try:
            grant = self.verifier.verify(token, at=appended_at_ms / 1000, grace=self.grace_seconds)
        except TokenRejected as rejected:
            return f"the command's token is refused: {rejected.message}"
        if command.subject != grant.subject:
            return (
                f"the command says it is from {command.subject!r}, its token is {grant.subject!r}'s"
            )
        missing = [(name, action) for name, action in wanted if not _covers(grant, name, action)]
        if missing:
            what = ", ".join(f"{action} on {name}" for name, action in missing)
            return f"{grant.subject}'s token does not allow {what}"
        return None


def _covers(grant: Grant, name: str, action: str) -> bool:
    return grant.allows_action("repository", name, action)
