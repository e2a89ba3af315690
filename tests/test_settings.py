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
    ],
)
def test_a_bad_value_names_its_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})
