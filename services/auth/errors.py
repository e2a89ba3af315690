"""What is wrong with the auth set-up: raised at start-up, reported as a usage error (exit 2)."""

from __future__ import annotations


class AuthSetupError(ValueError):
    """A key, the policy or the htpasswd file that the services cannot use."""
