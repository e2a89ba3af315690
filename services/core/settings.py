"""One settings object for every service, read from LAYERLOG_* environment variables.

The defaults match the local stack that `deploy/stack up` starts, so a newcomer sets nothing.
A malformed value raises SettingsError naming the variable, at start-up rather than mid-upload.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

MIB = 1 << 20
# S3 rejects multipart parts below 5 MiB (except the last), so staged parts are at least this big.
S3_MIN_PART_SIZE = 5 * MIB
# A chunk travels inside one Kafka record; the commands topic is created to accept this much.
MAX_CHUNK_CEILING = 64 * MIB

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class SettingsError(ValueError):
    """A LAYERLOG_* variable holds a value the services cannot use."""


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "layerlog"
    s3_secret_key: str = "layerlog-secret"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    bucket: str = "layerlog"
    # A key that may only read objects (a bucket policy grants it GetObject): blob redirects
    # are signed with it, so a presigned URL can never write or delete. `deploy/stack` creates
    # it on versitygw; "none" signs with the services' own key, for a server without policies.
    s3_read_access_key: str = "layerlog-reader"
    s3_read_secret_key: str = "layerlog-reader-secret"
    query_url: str = "http://127.0.0.1:8080"
    query_listen: str = "127.0.0.1:8080"
    commands_topic: str = "layerlog.commands"
    events_topic: str = "layerlog.events"
    dead_letter_topic: str = "layerlog.dead-letter"
    partitions: int = 6
    max_chunk_bytes: int = 8 * MIB
    part_size: int = S3_MIN_PART_SIZE
    index_path: str = "layerlog-index.sqlite"
    # The OCI registry (services/registry) listens here and keeps its own index: each process
    # that waits for its writes to be projected needs a projection of its own.
    registry_listen: str = "127.0.0.1:5000"
    registry_url: str = "http://127.0.0.1:5000"
    registry_index_path: str = "layerlog-registry-index.sqlite"
    # GET of a layer answers 307 to a presigned S3 URL instead of streaming the bytes through
    # the query service, as registries do; clients must then reach s3_endpoint themselves.
    blob_redirect: bool = False
    upload_ttl_seconds: int = 7 * 24 * 3600
    # How often each upload worker looks for idle uploads in the partitions it owns.
    expiry_interval_seconds: int = 600
    # Where the upload worker and the verifier serve Prometheus /metrics (the query service
    # serves it on query_listen).
    worker_metrics_listen: str = "127.0.0.1:9101"
    verifier_metrics_listen: str = "127.0.0.1:9102"
    # A Settings field (not a bare variable) so that whoever passes Settings to a service
    # process passes the level too.
    log_level: str = "INFO"

    # Logins and rights (services/auth). On unless LAYERLOG_AUTH=off, which is the explicit
    # opt-out; `layerlog auth init` (run by `make run`) creates what the defaults point at.
    auth: bool = True
    auth_htpasswd_file: str = ".cache/auth/htpasswd"
    auth_policy_file: str = ".cache/auth/policy.toml"
    auth_keys_dir: str = ".cache/auth/keys"
    # Other token servers whose tokens are accepted (TOML, see services/auth/keys.py); "" = none.
    auth_issuers_file: str = ""
    auth_issuer: str = "layerlog"  # the iss of the tokens this registry issues
    auth_service: str = "layerlog"  # the service of the Bearer challenge, and every token's aud
    # Where clients get tokens; "" is the registry's own: LAYERLOG_REGISTRY_URL + "/token".
    auth_realm: str = ""
    auth_token_ttl_seconds: int = 300
    # A command may reach the log this long after its token expired: the request that sent it
    # began with a valid token (a big PATCH streams for minutes). Judged at log-append time.
    auth_command_grace_seconds: int = 900
    # Requests per second per principal (a user, or an anonymous client's address), with
    # bursts of twice as many; over it, 429 with Retry-After.
    auth_rate_limit: int = 500
    # Failed logins per user and per client address within auth_login_window_seconds before
    # /token answers 429, until the oldest of them is that old.
    auth_login_failures: int = 5
    auth_login_window_seconds: int = 60
    # Requests waiting for a verdict or an outcome at once; past it, 429 with Retry-After.
    max_waiting_requests: int = 512

    # The SDK's and the CLI's own login (services/client/credentials.py), found the way registry
    # clients find one: LAYERLOG_USERNAME with LAYERLOG_PASSWORD or, for a mounted secret,
    # LAYERLOG_PASSWORD_FILE; without them a docker config.json; else anonymous.
    username: str = ""
    password: str = field(default="", repr=False)  # kept out of repr, so never in a log
    password_file: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for setting in fields(cls):
            variable = "LAYERLOG_" + setting.name.upper()
            raw = env.get(variable)
            if raw is None or raw == "":
                continue
            values[setting.name] = _convert(variable, raw, setting.type)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        _host_port("LAYERLOG_S3_ENDPOINT", self.s3_endpoint)
        _host_port("LAYERLOG_QUERY_LISTEN", self.query_listen)
        _host_port("LAYERLOG_REGISTRY_LISTEN", self.registry_listen)
        _host_port("LAYERLOG_WORKER_METRICS_LISTEN", self.worker_metrics_listen)
        _host_port("LAYERLOG_VERIFIER_METRICS_LISTEN", self.verifier_metrics_listen)
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(
                f"LAYERLOG_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        for server in self.kafka_bootstrap.split(","):
            _host_port("LAYERLOG_KAFKA_BOOTSTRAP", server.strip())
        _http_url("LAYERLOG_QUERY_URL", self.query_url, "http://127.0.0.1:8080")
        _http_url("LAYERLOG_REGISTRY_URL", self.registry_url, "http://127.0.0.1:5000")
        if not _BUCKET_NAME.match(self.bucket):
            raise SettingsError(
                f"LAYERLOG_BUCKET must be an S3 bucket name (3-63 of a-z 0-9 . -), "
                f"got {self.bucket!r}"
            )
        for name in ("commands_topic", "events_topic", "dead_letter_topic"):
            value = getattr(self, name)
            if not _TOPIC_NAME.match(value):
                raise SettingsError(
                    f"LAYERLOG_{name.upper()} must be a Kafka topic name "
                    f"(1-249 of A-Z a-z 0-9 . _ -), got {value!r}"
                )
        if self.partitions < 1:
            raise SettingsError(f"LAYERLOG_PARTITIONS must be at least 1, got {self.partitions}")
        if not 1 <= self.max_chunk_bytes <= MAX_CHUNK_CEILING:
            raise SettingsError(
                f"LAYERLOG_MAX_CHUNK_BYTES must be between 1 and {MAX_CHUNK_CEILING}, "
                f"got {self.max_chunk_bytes}"
            )
        if self.part_size < S3_MIN_PART_SIZE:
            raise SettingsError(
                f"LAYERLOG_PART_SIZE must be at least {S3_MIN_PART_SIZE} (the S3 minimum), "
                f"got {self.part_size}"
            )
        if self.upload_ttl_seconds < 1:
            raise SettingsError(
                f"LAYERLOG_UPLOAD_TTL_SECONDS must be at least 1, got {self.upload_ttl_seconds}"
            )

        for name in (
            "auth_token_ttl_seconds",
            "auth_rate_limit",
            "auth_login_failures",
            "auth_login_window_seconds",
            "max_waiting_requests",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(
                    f"LAYERLOG_{name.upper()} must be at least 1, got {getattr(self, name)}"
                )
        if self.auth_command_grace_seconds < 0:
            raise SettingsError(
                "LAYERLOG_AUTH_COMMAND_GRACE_SECONDS must be 0 or more, "
                f"got {self.auth_command_grace_seconds}"
            )
        if self.auth_realm:
            _http_url("LAYERLOG_AUTH_REALM", self.auth_realm, "https://registry.example/token")
        self._validate_login()

        if self.expiry_interval_seconds < 1:
            raise SettingsError(
                "LAYERLOG_EXPIRY_INTERVAL_SECONDS must be at least 1, "
                f"got {self.expiry_interval_seconds}"
            )

    def _validate_login(self) -> None:
        if self.password and self.password_file:
            raise SettingsError(
                "LAYERLOG_PASSWORD and LAYERLOG_PASSWORD_FILE are both set; set one of them"
            )
        if (self.password or self.password_file) and not self.username:
            which = "LAYERLOG_PASSWORD" if self.password else "LAYERLOG_PASSWORD_FILE"
            raise SettingsError(f"{which} is set but LAYERLOG_USERNAME is not")
        if self.username and not (self.password or self.password_file):
            raise SettingsError(
                "LAYERLOG_USERNAME is set but neither LAYERLOG_PASSWORD nor "
                "LAYERLOG_PASSWORD_FILE is"
            )
        if ":" in self.username:
            # HTTP Basic ends the user name at the first colon.
            raise SettingsError(f"LAYERLOG_USERNAME cannot contain ':', got {self.username!r}")

    @property
    def s3_reader(self) -> str | None:
        """The read-only S3 account's access key; None when there is none."""
        key = self.s3_read_access_key.strip()
        return None if key.lower() in ("", "none") else key

    @property
    def token_realm(self) -> str:
        return self.auth_realm or self.registry_url.rstrip("/") + "/token"

    @property
    def query_host_port(self) -> tuple[str, int]:
        return _host_port("LAYERLOG_QUERY_LISTEN", self.query_listen)

    @property
    def registry_host_port(self) -> tuple[str, int]:
        return _host_port("LAYERLOG_REGISTRY_LISTEN", self.registry_listen)


def _convert(variable: str, raw: str, kind: object) -> object:
    if kind in (bool, "bool"):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{variable} must be true or false, got {raw!r}")
    if kind in (int, "int"):
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(f"{variable} must be a whole number, got {raw!r}") from None
    return raw.strip()


def _http_url(variable: str, value: str, example: str) -> None:
    url = urlsplit(value)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise SettingsError(f"{variable} must be an http(s) URL like {example}, got {value!r}")


def _host_port(variable: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{variable} must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)
