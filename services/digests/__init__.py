"""Layer digests: sha256/384/512 over the bytes and TarSum v0/v1/dev over the tar inside.

A pure library, with no Kafka or S3: every service that judges or names a layer uses it, and so
does ``python -m services.digests.cli``.
"""
