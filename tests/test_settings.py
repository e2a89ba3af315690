import pytest

from services.core.settings import Settings, SettingsError


def test_defaults_match_the_local_stack():
    settings = Settings.from_env({})
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.s3_endpoint == "127.0.0.1:9000"
    assert settings.s3_secure is False
    assert settings.bucket == "layerlog"


def test_values_are_read_and_converted():
    settings = Settings.from_env(
        {"LAYERLOG_S3_SECURE": "true", "LAYERLOG_PARTITIONS": "12", "LAYERLOG_BUCKET": "layers"}
    )
    assert settings.s3_secure is True
    assert settings.partitions == 12
    assert settings.bucket == "layers"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LAYERLOG_S3_SECURE", "maybe"),
        ("LAYERLOG_PARTITIONS", "six"),
        ("LAYERLOG_PARTITIONS", "0"),
        ("LAYERLOG_KAFKA_BOOTSTRAP", "localhost"),
        ("LAYERLOG_S3_ENDPOINT", "127.0.0.1:99999"),
        ("LAYERLOG_QUERY_URL", "ftp://x"),
        ("LAYERLOG_BUCKET", "Bad_Bucket"),
        ("LAYERLOG_EVENTS_TOPIC", "has space"),
        ("LAYERLOG_PART_SIZE", "1024"),
        ("LAYERLOG_MAX_CHUNK_BYTES", "0"),
        ("LAYERLOG_KAFKA_REPLICATION_FACTOR", "-1"),
        ("LAYERLOG_KAFKA_REPLICATION_FACTOR", "three"),
    ],
)
def test_a_bad_value_names_its_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_a_cluster_is_named_by_its_bootstrap_list_and_replicated_as_asked():
    settings = Settings.from_env(
        {
            "LAYERLOG_KAFKA_BOOTSTRAP": "127.0.0.1:39100,127.0.0.1:39103,127.0.0.1:39106",
            "LAYERLOG_KAFKA_REPLICATION_FACTOR": "3",
        }
    )
    assert settings.kafka_bootstrap.count(",") == 2
    assert settings.kafka_replication_factor == 3
    # Unset: provisioning takes min(3, the brokers the cluster lists).
    assert Settings.from_env({}).kafka_replication_factor == 0
