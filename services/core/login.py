"""Why Kafka does not let a principal in, said plainly.

When every bootstrap server fails, aiokafka's clients raise a bare KafkaConnectionError ("Unable
to bootstrap from ...") and only log the reason. So services and the SDK ask this probe once: it
logs in to each bootstrap server with aiokafka.conn.create_conn, which raises the reason itself
(a SASL refusal, a certificate that does not verify). That function is not documented API: this
module is its one seam, aiokafka is pinned to 0.14.x in pyproject.toml, and
tests/test_kafka_security.py checks what it says for a wrong password and a missing CA.
"""

from __future__ import annotations

import asyncio
import ssl

from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError

from services.core import kafka
from services.core.principals import Principal
from services.core.settings import Settings


async def login_problem(
    settings: Settings, principal: Principal, timeout: float = 10.0
) -> kafka.KafkaRefused | None:
    """A KafkaRefused saying why, when a bootstrap server refuses the principal's login or its
    certificate does not verify; None when it logs in, or when Kafka cannot be reached (that is
    worth a retry, a refusal is not)."""
    options = kafka.connection(settings, principal)
    options.pop("bootstrap_servers")
    user = options.get("sasl_plain_username", "(none)")
    for server in settings.kafka_bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(host.strip("[]"), int(port), request_timeout_ms=10_000, **options),
                timeout,
            )
        except ssl.SSLCertVerificationError as error:
            ca = settings.kafka_ca_file or "the system's CAs (LAYERLOG_KAFKA_CA_FILE is unset)"
            return kafka.KafkaRefused(
                f"Kafka at {server.strip()}: its TLS certificate does not verify against {ca}: "
                f"{error.verify_message}"
            )
        except KafkaError as error:
            if kafka.refused(error):
                return kafka.KafkaRefused(
                    f"Kafka at {server.strip()} refused user {user!r} "
                    f"({settings.kafka_security_protocol}, {settings.kafka_sasl_mechanism}): "
                    f"{error}; check LAYERLOG_KAFKA_SASL_USER and its password file"
                )
            continue
        except (OSError, TimeoutError):
            continue  # not reachable: not a refusal
        await conn.close()
        return None
    return None
