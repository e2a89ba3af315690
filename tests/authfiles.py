"""Login files for a test run: a signing key, an htpasswd file and a policy in a folder of the
run's own, as `layerlog auth init` lays them out for `make run`."""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

from services.auth.keys import generate_key_pair
from services.auth.passwords import Htpasswd
from services.core.settings import Settings

USERS = {"admin": "admin-secret-1", "alice": "alice-secret-2", "carol": "carol-secret-3"}

POLICY = """\
admins = ["admin"]

[groups]
team = ["alice", "carol"]

[repositories."library/*"]
anonymous = ["pull"]

[repositories."alice/**"]
alice = ["pull", "push", "delete"]

[repositories."shared/*"]
"group:team" = ["pull", "push"]

[repositories."shared/locked"]
carol = ["pull"]

[repositories."readonly/*"]
alice = ["pull"]
"""


def with_auth(settings: Settings, folder: Path, users: dict[str, str] | None = None) -> Settings:
    """settings with logins on, over files written into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = folder / "keys"
    if not list(keys.glob("*.key")):
        generate_key_pair(keys)
    htpasswd = Htpasswd(folder / "htpasswd")
    for name, password in (users or USERS).items():
        htpasswd.add(name, password)
    (folder / "policy.toml").write_text(POLICY)
    return replace(
        settings,
        auth=True,
        auth_keys_dir=str(keys),
        auth_htpasswd_file=str(folder / "htpasswd"),
        auth_policy_file=str(folder / "policy.toml"),
    )


def fetch_token(registry_url: str, user: str | None, password: str | None, *scopes: str) -> str:
    """A token from the registry's /token, as a client gets one (user None: anonymous)."""
    query = urllib.parse.urlencode([("service", "layerlog"), *(("scope", s) for s in scopes)])
    request = urllib.request.Request(f"{registry_url}/token?{query}")
    if user is not None:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["token"])


def admin_bearer(registry_url: str, repository: str) -> dict[str, str]:
    """Headers carrying the admin's token for every action on the repository."""
    token = fetch_token(
        registry_url, "admin", USERS["admin"], f"repository:{repository}:pull,push,delete"
    )
    return {"Authorization": f"Bearer {token}"}
