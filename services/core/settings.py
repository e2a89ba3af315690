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


# --- Kafka security ---
KAFKA_SECURITY_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL", "PLAINTEXT")
KAFKA_SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
_KAFKA_USER = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


@dataclass(frozen=True)
class KafkaLogin:
    user: str
    password: str = field(repr=False)


def _readable(variable: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise SettingsError(f"{variable}: cannot read {path} ({error.strerror})") from None


# --- end of Kafka security ---


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    # --- Kafka security (see kafka_login and the block at the end of this class) ---
    # The local stack's listener: SASL over plain TCP, SCRAM-SHA-512. PLAINTEXT is only for an
    # external cluster without authentication; the local stack has no such listener.
    kafka_security_protocol: str = "SASL_PLAINTEXT"
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    # Empty: each process logs in as its own principal (services/core/principals.py) with the
    # password in <kafka_credentials_dir>/<principal>.password, where `deploy/stack up` writes
    # them. Set, every client of the process logs in as this user / with this password.
    kafka_sasl_user: str = ""
    kafka_sasl_password_file: str = ""
    # Relative to the working directory: the repository root for `make run|test|bench`
    # (deploy/with-stack sets it to the stack's own directory when it is unset).
    kafka_credentials_dir: str = ".cache/kafka/credentials"
    # SASL_SSL only: the CA that signed the brokers' certificates (empty: the system's CAs).
    kafka_ca_file: str = ""
    # --- end of Kafka security ---
    # Copies of each partition of the topics `provision` creates; 0: min(3, the brokers the
    # cluster lists when it runs). Set it for a production cluster, so a broker that happens to
    # be down while provisioning runs does not leave new topics with fewer copies.
    kafka_replication_factor: int = 0
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

    # Replicas and snapshots (services/query/replica.py, services/query/snapshots.py).
    # SO_REUSEPORT on the query's and the registry's listening sockets: replicas on one host
    # share LAYERLOG_QUERY_LISTEN / LAYERLOG_REGISTRY_LISTEN and the kernel spreads connections
    # over those that listen. A replica then listens there only once it has caught up.
    reuse_port: bool = False
    # A replica's own address for /healthz, /readyz and /metrics, answering from the moment the
    # process starts (while it restores a snapshot or catches up); "" = none.
    query_status_listen: str = ""
    registry_status_listen: str = ""
    # How often a replica uploads a snapshot of its index to S3; 0 = never (only on demand,
    # `layerlog snapshot`).
    snapshot_interval_seconds: int = 0
    # Complete snapshots kept per events topic; older ones are deleted after each new one.
    snapshot_keep: int = 3
    # A replica whose index is new starts from the newest valid snapshot, not the log's start.
    snapshot_restore: bool = True
    # The garbage collector (services/gc): bytes nothing has linked for this long are reclaimed
    # (0: as soon as nothing links them, for tests); a sweep this often; its own index.
    gc_grace_seconds: int = 24 * 3600
    gc_interval_seconds: int = 3600
    gc_index_path: str = "layerlog-gc-index.sqlite"
    gc_metrics_listen: str = "127.0.0.1:9103"

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
        _host_port("LAYERLOG_GC_METRICS_LISTEN", self.gc_metrics_listen)
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(
                f"LAYERLOG_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        for server in self.kafka_bootstrap.split(","):
            _host_port("LAYERLOG_KAFKA_BOOTSTRAP", server.strip())
        self._validate_kafka_security()
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
        if self.kafka_replication_factor < 0:
            raise SettingsError(
                "LAYERLOG_KAFKA_REPLICATION_FACTOR must be 0 (min(3, the cluster's brokers)) "
                f"or a number of copies, got {self.kafka_replication_factor}"
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

        self._validate_replicas()

        if self.gc_grace_seconds < 0:
            raise SettingsError(
                f"LAYERLOG_GC_GRACE_SECONDS must be 0 or more, got {self.gc_grace_seconds}"
            )
        if self.gc_interval_seconds < 1:
            raise SettingsError(
                f"LAYERLOG_GC_INTERVAL_SECONDS must be at least 1, got {self.gc_interval_seconds}"
            )
        if self.expiry_interval_seconds < 1:
            raise SettingsError(
                "LAYERLOG_EXPIRY_INTERVAL_SECONDS must be at least 1, "
                f"got {self.expiry_interval_seconds}"
            )

    def _validate_replicas(self) -> None:
        for variable, value in (
            ("LAYERLOG_QUERY_STATUS_LISTEN", self.query_status_listen),
            ("LAYERLOG_REGISTRY_STATUS_LISTEN", self.registry_status_listen),
        ):
            if value:
                _host_port(variable, value)
        if self.snapshot_interval_seconds < 0:
            raise SettingsError(
                "LAYERLOG_SNAPSHOT_INTERVAL_SECONDS must be 0 (off) or more, "
                f"got {self.snapshot_interval_seconds}"
            )
        if self.snapshot_keep < 1:
            raise SettingsError(
                f"LAYERLOG_SNAPSHOT_KEEP must be at least 1, got {self.snapshot_keep}"
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

    # --- Kafka security ---

    def _validate_kafka_security(self) -> None:
        if self.kafka_security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise SettingsError(
                "LAYERLOG_KAFKA_SECURITY_PROTOCOL must be one of "
                f"{', '.join(KAFKA_SECURITY_PROTOCOLS)}, got {self.kafka_security_protocol!r}"
            )
        if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
            raise SettingsError(
                "LAYERLOG_KAFKA_SASL_MECHANISM must be one of "
                f"{', '.join(KAFKA_SASL_MECHANISMS)}, got {self.kafka_sasl_mechanism!r}"
            )
        if self.kafka_sasl_user and not _KAFKA_USER.match(self.kafka_sasl_user):
            raise SettingsError(
                "LAYERLOG_KAFKA_SASL_USER must be a user name (1-64 of A-Z a-z 0-9 . _ @ -), "
                f"got {self.kafka_sasl_user!r}"
            )
        if self.kafka_security_protocol == "PLAINTEXT":
            for variable, value in (
                ("LAYERLOG_KAFKA_SASL_USER", self.kafka_sasl_user),
                ("LAYERLOG_KAFKA_SASL_PASSWORD_FILE", self.kafka_sasl_password_file),
            ):
                if value:
                    raise SettingsError(
                        f"{variable} is set, but LAYERLOG_KAFKA_SECURITY_PROTOCOL=PLAINTEXT "
                        "sends no credentials; use SASL_PLAINTEXT or SASL_SSL"
                    )
        if not self.kafka_credentials_dir.strip():
            raise SettingsError("LAYERLOG_KAFKA_CREDENTIALS_DIR must name a directory")
        if self.kafka_ca_file:
            if self.kafka_security_protocol != "SASL_SSL":
                raise SettingsError(
                    "LAYERLOG_KAFKA_CA_FILE is only used with "
                    f"LAYERLOG_KAFKA_SECURITY_PROTOCOL=SASL_SSL, "
                    f"not {self.kafka_security_protocol}"
                )
            _readable("LAYERLOG_KAFKA_CA_FILE", self.kafka_ca_file)

    def kafka_login(self, principal: str) -> KafkaLogin | None:
        """The user and password `principal` logs in to Kafka with (None under PLAINTEXT).

        Read when a client is made, so a missing or unreadable password file stops a service
        as it starts, with the file and the variable to set named."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return None
        user = self.kafka_sasl_user or str(principal)
        if self.kafka_sasl_password_file:
            variable, path = "LAYERLOG_KAFKA_SASL_PASSWORD_FILE", self.kafka_sasl_password_file
            hint = "set it to a readable file"
        else:
            variable = "LAYERLOG_KAFKA_CREDENTIALS_DIR"
            path = os.path.join(self.kafka_credentials_dir, f"{user}.password")
            hint = (
                "`deploy/stack up` writes the local stack's there; or set "
                "LAYERLOG_KAFKA_CREDENTIALS_DIR to where they are, or "
                "LAYERLOG_KAFKA_SASL_PASSWORD_FILE"
            )
        try:
            with open(path, encoding="utf-8") as file:
                password = file.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise SettingsError(
                f"{variable}: cannot read the Kafka password of user {user!r} from {path} "
                f"({reason}); {hint}"
            ) from None
        if not password:
            raise SettingsError(f"{variable}: the Kafka password file {path} is empty")
        return KafkaLogin(user, password)

    # --- end of Kafka security ---

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
