"""The htpasswd file the token endpoint checks logins against: `user:bcrypt-hash` per line.

Only bcrypt hashes ($2a$, $2b$, $2y$) are accepted; Apache's MD5 and SHA-1 forms are refused when
the file is read, not silently treated as a wrong password. The file is read again whenever it
changes, so `layerlog user add` takes effect without a restart.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import bcrypt

from services.auth.errors import AuthSetupError

# A user name travels in tokens, events and the policy file: keep it to a plain grammar.
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
# bcrypt's default cost (2^12 rounds, ~0.25 s here): slow enough to make guessing expensive.
ROUNDS = 12
# Only the first 72 bytes of a password count in bcrypt; a longer one is refused, not cut.
MAX_PASSWORD_BYTES = 72


class PasswordFileInvalid(AuthSetupError):
    pass


class UserInvalid(ValueError):
    pass


# Words the policy file gives a meaning of its own; no user may take them.
RESERVED_USERS = frozenset({"anonymous", "authenticated"})


def check_user(name: str) -> str:
    if name in RESERVED_USERS:
        raise UserInvalid(f"{name!r} is reserved by the policy file; choose another name")
    if not _USER.match(name):
        raise UserInvalid(
            f"a user name is 1-128 of A-Z a-z 0-9 . _ @ - and starts with a letter or digit, "
            f"got {name[:130]!r}"
        )
    return name


def hash_password(password: str) -> str:
    data = password.encode()
    if not data:
        raise UserInvalid("the password is empty")
    if len(data) > MAX_PASSWORD_BYTES:
        raise UserInvalid(f"a password is at most {MAX_PASSWORD_BYTES} bytes (bcrypt's limit)")
    return bcrypt.hashpw(data, bcrypt.gensalt(ROUNDS)).decode()


# Checked against when the user does not exist, so an unknown user costs the same time as a
# wrong password and the answer's timing does not tell which names exist.
_DECOY = bcrypt.hashpw(b"layerlog-decoy-password", bcrypt.gensalt(ROUNDS))


class Htpasswd:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._hashes: dict[str, bytes] = {}

    def verify(self, user: str, password: str) -> bool:
        """True only for a known user and their password; takes a bcrypt check either way."""
        stored = self._current().get(user)
        data = password.encode()
        try:
            # bcrypt refuses more than 72 bytes; the check still runs, so the time is the same.
            matched = bcrypt.checkpw(data[:MAX_PASSWORD_BYTES], stored or _DECOY)
        except ValueError:  # a NUL byte, say: no stored password has one
            matched = False
        return stored is not None and matched and len(data) <= MAX_PASSWORD_BYTES

    def users(self) -> list[str]:
        return sorted(self._current())

    def add(self, user: str, password: str) -> bool:
        """Sets the user's password; True when the user is new."""
        check_user(user)
        hashed = hash_password(password)
        with self._lock:
            entries = self._read()
            new = user not in entries
            entries[user] = hashed.encode()
            self._write(entries)
        return new

    def remove(self, user: str) -> bool:
        with self._lock:
            entries = self._read()
            if entries.pop(user, None) is None:
                return False
            self._write(entries)
        return True

    def _current(self) -> dict[str, bytes]:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (status.st_mtime_ns, status.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._hashes = self._read()
                self._stamp = stamp
            return self._hashes

    def _read(self) -> dict[str, bytes]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        entries: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, hashed = line.strip().partition(":")
            if not sep or not _USER.match(user) or not _BCRYPT.match(hashed):
                raise PasswordFileInvalid(
                    f"{self.path} line {number}: expected user:bcrypt-hash "
                    "(htpasswd -B makes one; `layerlog user add` writes them)"
                )
            entries[user] = hashed.encode()
        return entries

    def _write(self, entries: dict[str, bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            for name, hashed in sorted(entries.items()):
                out.write(f"{name}:{hashed.decode()}\n")
        os.replace(temporary, self.path)  # readers see the old file or the new one, never half
