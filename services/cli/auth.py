"""`layerlog auth init|rotate-key` and `layerlog user add|remove`: the files logins rest on."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from services.auth.keys import generate_key_pair, load_signing_key
from services.auth.passwords import Htpasswd, PasswordFileInvalid, UserInvalid
from services.cli.exits import EXIT_NO, EXIT_OK, EXIT_USAGE
from services.core.settings import Settings

ADMIN = "admin"
DEFAULT_POLICY = """\
# Who may do what in which repositories; see README.md, "Logins and rights".
# Deny by default: a user not named here (or in a group named here) gets nothing.
admins = ["admin"]

[groups]
# builders = ["ci-bot"]

[repositories]
# "library/*" = { anonymous = ["pull"] }
# "team-a/**" = { "group:builders" = ["pull", "push"], alice = ["pull", "push", "delete"] }
"""


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def admin_password_path(settings: Settings) -> Path:
    return Path(settings.auth_htpasswd_file).parent / "admin.password"


def init(args: argparse.Namespace) -> int:
    return prepare(Settings.from_env(), quiet=args.quiet)


def prepare(settings: Settings, *, quiet: bool) -> int:
    """Creates what is missing (a signing key, the policy, the admin user); keeps what is there."""
    made = []
    if not list(Path(settings.auth_keys_dir).glob("*.key")):
        made.append(f"signing key {generate_key_pair(settings.auth_keys_dir)}")
    policy = Path(settings.auth_policy_file)
    if not policy.exists():
        _write_private(policy, DEFAULT_POLICY)
        made.append(f"policy {policy}")
    users = Htpasswd(settings.auth_htpasswd_file)
    password_file = admin_password_path(settings)
    try:
        known = users.users()
    except PasswordFileInvalid as bad:
        print(f"layerlog: {bad}", file=sys.stderr)
        return EXIT_USAGE
    if ADMIN not in known:
        password = secrets.token_urlsafe(18)
        users.add(ADMIN, password)
        _write_private(password_file, password + "\n")
        made.append(f"user {ADMIN} (password in {password_file})")
    for line in made:
        print(f"auth: created {line}")
    if not quiet:
        registry = settings.registry_url.split("://", 1)[-1]
        print(
            f"auth: log in as {ADMIN}: "
            f"crane auth login {registry} -u {ADMIN} --password-stdin < {password_file}"
        )
    return EXIT_OK


def rotate_key(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    path = generate_key_pair(settings.auth_keys_dir)
    print(f"auth: new signing key {path} (kid {load_signing_key(settings.auth_keys_dir).kid})")
    print(
        "auth: restart the registry to sign with it; remove the older .pub (and .key) once "
        f"tokens signed by it have expired ({settings.auth_token_ttl_seconds}s)"
    )
    return EXIT_OK


def user_add(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    password = sys.stdin.readline().rstrip("\r\n")
    try:
        new = Htpasswd(settings.auth_htpasswd_file).add(args.name, password)
    except (UserInvalid, PasswordFileInvalid) as bad:
        print(f"layerlog: {bad}", file=sys.stderr)
        return EXIT_USAGE
    print(f"user {args.name} {'added' if new else 'password changed'}")
    return EXIT_OK


def user_remove(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        removed = Htpasswd(settings.auth_htpasswd_file).remove(args.name)
    except PasswordFileInvalid as bad:
        print(f"layerlog: {bad}", file=sys.stderr)
        return EXIT_USAGE
    if not removed:
        print(f"layerlog: no user {args.name}", file=sys.stderr)
        return EXIT_NO
    print(f"user {args.name} removed (tokens already issued run out within their lifetime)")
    return EXIT_OK


def register(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Adds the subcommands through parser.py's `command(name, about, description)`."""
    auth = command("auth", "set up and rotate the registry's token signing")
    steps = auth.add_subparsers(metavar="STEP")
    setup = steps.add_parser(
        "init",
        help="create the signing key, the policy and the admin user if missing",
        description="Creates what logins need where the LAYERLOG_AUTH_* settings point: an "
        "Ed25519 signing key, a deny-by-default policy naming admin, and the user admin with "
        "a random password written to admin.password beside the htpasswd file. Keeps "
        "whatever exists already.",
    )
    setup.add_argument("-q", "--quiet", action="store_true", help="do not print how to log in")
    setup.set_defaults(handler=init)
    rotate = steps.add_parser("rotate-key", help="add a newer signing key")
    rotate.set_defaults(handler=rotate_key)

    user = command("user", "add or remove a login")
    actions = user.add_subparsers(metavar="ACTION")
    add = actions.add_parser(
        "add", help="add a user or change a password (the password is read from stdin)"
    )
    add.add_argument("name")
    add.set_defaults(handler=user_add)
    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    remove.set_defaults(handler=user_remove)
