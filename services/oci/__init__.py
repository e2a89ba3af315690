"""The OCI distribution and image specs' rules, as a pure library with no Kafka or S3.

References (tags and digests), media types and manifest parsing: the registry's write side
validates a PUT with it, the upload worker re-checks the command with it, and the read side
builds referrers answers with it, so all three agree on what a manifest says.
"""
