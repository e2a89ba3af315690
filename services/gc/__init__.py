"""The garbage collector: reclaims the bytes of blobs and manifests no repository links any more,
deciding from an index it projects from the log itself (services/gc/sweep.py has the protocol)."""
