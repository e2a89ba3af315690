"""The Layerlog SDK: the registry's LayerService semantics over Kafka commands and the query API.

async with LayerService() as ls:
    up = await ls.upload("library/ubuntu")
    await up.write(data)
    layer = await up.finish(len(data), digest)
"""

from services.client.errors import (
    LayerError,
    LayerExists,
    LayerInvalidDigest,
    LayerInvalidLength,
    LayerNameInvalid,
    LayerTarSumVersionUnsupported,
    LayerUnknown,
    LayerUploadUnknown,
)
from services.client.service import Layer, LayerService, LayerUpload

__all__ = [
    "Layer",
    "LayerError",
    "LayerExists",
    "LayerInvalidDigest",
    "LayerInvalidLength",
    "LayerNameInvalid",
    "LayerService",
    "LayerTarSumVersionUnsupported",
    "LayerUnknown",
    "LayerUpload",
    "LayerUploadUnknown",
]
