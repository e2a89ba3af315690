"""The SDK's exceptions, named after the registry LayerService's errors."""

from __future__ import annotations


class LayerError(Exception):
    """Base of every error the SDK raises."""


class LayerUnknown(LayerError):
    """The layer is not committed to that repository."""


class LayerExists(LayerError):
    """The layer exists already."""


class LayerTarSumVersionUnsupported(LayerError):
    """The digest names a TarSum version the verifier does not know."""


class LayerUploadUnknown(LayerError):
    """No such upload in progress: never started, or finished, cancelled or expired."""


class LayerInvalidDigest(LayerError):
    """The digest is malformed, or the bytes do not have it."""


class LayerInvalidLength(LayerError):
    """The size given to finish() is not the number of bytes uploaded."""


class LayerNameInvalid(LayerError):
    """The repository name breaks the distribution grammar."""


class LayerUnauthorized(LayerError):
    """Layerlog will not let the caller do this: who they are, or what they may do, is refused."""


class LayerLoginFailed(LayerUnauthorized):
    """The login is refused or cannot be made: a wrong user name or password, too many failed
    logins, credentials that cannot be read (a credential helper that fails), or a token endpoint
    that is not there."""


class LayerAccessDenied(LayerUnauthorized):
    """The policy does not let this user (or an anonymous caller) do this in the repository; the
    upload worker's UNAUTHORIZED rejection of a command is this error too."""


VERDICT_ERRORS: dict[str, type[LayerError]] = {
    "INVALID_DIGEST": LayerInvalidDigest,
    "MALFORMED_LAYER": LayerInvalidDigest,
    "INVALID_LENGTH": LayerInvalidLength,
    "TARSUM_VERSION_UNSUPPORTED": LayerTarSumVersionUnsupported,
    "UNKNOWN_UPLOAD": LayerUploadUnknown,
    "UPLOAD_FINISHED": LayerUploadUnknown,
    "UPLOAD_CANCELLED": LayerUploadUnknown,
    "INVALID_REPOSITORY": LayerNameInvalid,
    "REPOSITORY_MISMATCH": LayerUploadUnknown,
    "UNAUTHORIZED": LayerAccessDenied,
}

# The query service's 400 codes for a layer request.
HTTP_ERRORS: dict[str, type[LayerError]] = {
    "DIGEST_INVALID": LayerInvalidDigest,
    "TARSUM_VERSION_UNSUPPORTED": LayerTarSumVersionUnsupported,
    "NAME_INVALID": LayerNameInvalid,
}
