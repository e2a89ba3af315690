"""The Layerlog SDK: the registry's LayerService semantics over Kafka commands and the query API.

async with LayerService() as ls:
    up = await ls.upload("library/ubuntu")
    await up.write(data)
    layer = await up.finish(len(data), digest)
"""

from services.client.errors import (
    LayerAccessDenied,
    LayerError,
    LayerExists,
    LayerInvalidDigest,
    LayerInvalidLength,
    LayerLoginFailed,
    LayerNameInvalid,
    LayerTarSumVersionUnsupported,
    LayerUnauthorized,
    LayerUnknown,
    LayerUploadUnknown,
)
from services.client.service import Layer, LayerService, LayerUpload

__all__ = [
    "Layer",
    "LayerAccessDenied",
    "LayerError",
    "LayerExists",
    "LayerInvalidDigest",
    "LayerInvalidLength",
    "LayerLoginFailed",
    "LayerNameInvalid",
    "LayerService",
    "LayerTarSumVersionUnsupported",
    "LayerUnauthorized",
    "LayerUnknown",
    "LayerUpload",
    "LayerUploadUnknown",
]
