"""The auth package's logic, without a stack: policy, scopes, tokens, passwords, authority."""

from __future__ import annotations

import time
from pathlib import Path

import bcrypt
import pytest

from services.auth import passwords
from services.auth.authority import CommandAuthority, needed
from services.auth.keys import (
    KeyInvalid,
    generate_key_pair,
    load_signing_key,
    load_verifying_keys,
)
from services.auth.passwords import Htpasswd, PasswordFileInvalid, UserInvalid
from services.auth.policy import PolicyInvalid, parse_policy
from services.auth.scopes import ScopeInvalid, parse_scopes, repository
from services.auth.tokens import TokenIssuer, TokenProblem, TokenRejected, TokenVerifier
from services.core.records import (
    AppendChunk,
    DeleteTag,
    ExpireUpload,
    MountBlob,
    PutManifest,
    StartUpload,
)

POLICY = """
admins = ["root"]
[groups]
ops = ["olga"]
[repositories."team/**"]
alice = ["pull", "push"]
"group:ops" = ["pull", "push", "delete"]
[repositories."team/frozen"]
alice = ["pull"]
[repositories."pub/*"]
anonymous = ["pull"]
authenticated = ["pull", "push"]
"""


def test_the_longest_matching_pattern_decides_and_can_take_rights_away() -> None:
    rules = parse_policy(POLICY)
    assert rules.actions("alice", "team/app/sub") == {"pull", "push"}
    assert rules.actions("alice", "team/frozen") == {"pull"}
    assert rules.actions("olga", "team/app") == {"pull", "push", "delete"}
    assert rules.actions("olga", "team/frozen") == frozenset()
    assert rules.actions("root", "anything/at/all") == {"pull", "push", "delete"}


def test_anonymous_and_authenticated_entries_and_deny_by_default() -> None:
    rules = parse_policy(POLICY)
    assert rules.actions(None, "pub/x") == {"pull"}
    assert rules.actions("bob", "pub/x") == {"pull", "push"}
    assert rules.actions(None, "pub/x/y") == frozenset()  # * stays within one component
    assert rules.actions("bob", "team/app") == frozenset()
    assert rules.actions(None, "elsewhere") == frozenset()


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("admins = 'root'", "admins is a list"),
        ('[repositories."Team/*"]\nalice = ["pull"]', "not a repository pattern"),
        ('[repositories."a/*"]\nalice = ["fly"]', "pull, push, delete"),
        ('[repositories."a/*"]\n"group:none" = ["pull"]', "undefined"),
        ("owners = []", "unknown keys"),
        ("[[broken", "not valid TOML"),
    ],
)
def test_a_bad_policy_says_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(PolicyInvalid, match=complaint):
        parse_policy(text)


def test_scopes_parse_as_docker_sends_them() -> None:
    found = parse_scopes(
        ["repository:a/b:pull,push repository:host:5000/c:pull", "registry:catalog:*"]
    )
    assert [(a.type, a.name, sorted(a.actions)) for a in found] == [
        ("repository", "a/b", ["pull", "push"]),
        ("repository", "host:5000/c", ["pull"]),
        ("registry", "catalog", ["*"]),
    ]
    assert parse_scopes(["repository:a:fly,pull"])[0].actions == {"pull"}  # unknown dropped
    with pytest.raises(ScopeInvalid):
        parse_scopes(["repository"])


@pytest.fixture()
def keys(tmp_path: Path) -> Path:
    generate_key_pair(tmp_path / "keys")
    return tmp_path / "keys"


def issuer_and_verifier(keys: Path) -> tuple[TokenIssuer, TokenVerifier]:
    issuer = TokenIssuer(load_signing_key(keys), "layerlog", "layerlog", 300)
    return issuer, TokenVerifier(load_verifying_keys(keys, "layerlog"), "layerlog")


def test_a_token_is_valid_until_it_expires_and_grace_extends_it(keys: Path) -> None:
    issuer, verifier = issuer_and_verifier(keys)
    issued = issuer.issue("alice", [repository("a/b", "pull")], now=1_000_000)
    grant = verifier.verify(issued.token, at=1_000_100)
    assert grant.subject == "alice" and grant.allows(repository("a/b", "pull"))
    assert not grant.allows(repository("a/b", "push"))
    with pytest.raises(TokenRejected) as expired:
        verifier.verify(issued.token, at=1_000_300)
    assert expired.value.problem == TokenProblem.EXPIRED
    assert verifier.verify(issued.token, at=1_000_300, grace=60).subject == "alice"
    with pytest.raises(TokenRejected) as early:
        verifier.verify(issued.token, at=1_000_000 - 3600)
    assert early.value.problem == TokenProblem.NOT_YET_VALID


def test_keys_rotate_by_kid_the_newest_signs_and_every_public_key_verifies(keys: Path) -> None:
    old_issuer, _ = issuer_and_verifier(keys)
    old = old_issuer.issue("alice", [])
    time.sleep(0.01)  # key files are named by the time, newest last
    generate_key_pair(keys)
    new_issuer, verifier = issuer_and_verifier(keys)
    assert new_issuer.key.kid != old_issuer.key.kid
    for token in (old.token, new_issuer.issue("alice", []).token):
        assert verifier.verify(token).subject == "alice"
    # The old public key removed: its tokens are refused, by kid.
    sorted(keys.glob("*.pub"))[0].unlink()  # the older pair's public half
    with pytest.raises(TokenRejected) as gone:
        TokenVerifier(load_verifying_keys(keys, "layerlog"), "layerlog").verify(old.token)
    assert gone.value.problem == TokenProblem.UNKNOWN_KEY


def test_another_issuer_s_key_is_trusted_only_for_its_own_iss(keys: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_key_pair(other)
    issuers = tmp_path / "issuers.toml"
    public = next(other.glob("*.pub"))
    issuers.write_text(f'[[issuer]]\nname = "https://auth.example"\npublic_key = "{public}"\n')
    verifier = TokenVerifier(load_verifying_keys(keys, "layerlog", str(issuers)), "layerlog")
    theirs = TokenIssuer(load_signing_key(other), "https://auth.example", "layerlog", 300)
    assert verifier.verify(theirs.issue("bob", []).token).issuer == "https://auth.example"
    posing = TokenIssuer(load_signing_key(other), "layerlog", "layerlog", 300)
    with pytest.raises(TokenRejected) as wrong:
        verifier.verify(posing.issue("bob", []).token)
    assert wrong.value.problem == TokenProblem.WRONG_ISSUER
    issuers.write_text("[[issuer]]\nname = 'x'\n")
    with pytest.raises(KeyInvalid, match="public_key"):
        load_verifying_keys(keys, "layerlog", str(issuers))


def test_htpasswd_add_verify_remove(tmp_path: Path) -> None:
    users = Htpasswd(tmp_path / "htpasswd")
    assert users.add("alice", "s3cret") is True
    assert users.verify("alice", "s3cret") and not users.verify("alice", "S3cret")
    assert users.add("alice", "other") is False
    assert users.verify("alice", "other") and not users.verify("alice", "s3cret")
    assert (tmp_path / "htpasswd").stat().st_mode & 0o777 == 0o600
    assert users.remove("alice") and not users.remove("alice")
    assert not users.verify("alice", "other")
    for bad in ("anonymous", "authenticated", "a:b", ""):
        with pytest.raises(UserInvalid):
            users.add(bad, "pw")
    with pytest.raises(UserInvalid, match="72"):
        users.add("bob", "x" * 73)


def test_an_unknown_user_costs_a_bcrypt_check_like_a_wrong_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = Htpasswd(tmp_path / "htpasswd")
    users.add("alice", "s3cret")
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(passwords.bcrypt, "checkpw", counting)
    assert not users.verify("nobody", "s3cret")
    assert not users.verify("alice", "wrong")
    assert not users.verify("alice", "s3cret" + "x" * 80)  # past bcrypt's 72 bytes
    assert len(checks) == 3 and checks[0] == passwords._DECOY


def test_a_non_bcrypt_htpasswd_line_is_refused_not_ignored(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("alice:$apr1$abcdefgh$0123456789abcdefghijkl\n")
    with pytest.raises(PasswordFileInvalid, match="line 1"):
        Htpasswd(path).verify("alice", "x")


def test_each_command_needs_the_action_it_performs() -> None:
    common = {"upload_id": "u", "repository": "a/b"}
    assert needed(StartUpload(**common)) == [("a/b", "push")]
    assert needed(AppendChunk(offset=0, data=b"", **common)) == [("a/b", "push")]
    assert needed(ExpireUpload(ttl_seconds=1, **common)) == []
    assert needed(DeleteTag(repository="a/b", tag="t")) == [("a/b", "delete")]
    mount = MountBlob(repository="a/b", digest="sha256:" + "0" * 64, source_repository="c/d")
    assert needed(mount) == [("a/b", "push"), ("c/d", "pull")]
    put = PutManifest(repository="a/b", reference="t", digest="d", media_type="m", body=b"")
    assert needed(put) == [("a/b", "push")]


def test_the_worker_judges_a_command_by_its_log_append_time(keys: Path) -> None:
    issuer, verifier = issuer_and_verifier(keys)
    authority = CommandAuthority(verifier, grace_seconds=60)
    token = issuer.issue("alice", [repository("a/b", "push")], now=1_000_000).token
    command = StartUpload(upload_id="u", repository="a/b", subject="alice", token=token)
    assert authority.refusal(command, appended_at_ms=1_000_100_000) is None
    assert authority.refusal(command, appended_at_ms=1_000_350_000) is None  # within grace
    late = authority.refusal(command, appended_at_ms=1_000_400_000)
    assert late is not None and "expired" in late
    posing = StartUpload(upload_id="u", repository="a/b", subject="admin", token=token)
    assert "admin" in (authority.refusal(posing, appended_at_ms=1_000_100_000) or "")
    elsewhere = StartUpload(upload_id="u", repository="c/d", subject="alice", token=token)
    assert "push on c/d" in (authority.refusal(elsewhere, appended_at_ms=1_000_100_000) or "")
    discovered = MountBlob(repository="a/b", digest="d", source_repository=None, token=token)
    assert "name the repository" in (authority.refusal(discovered, 1_000_100_000) or "")
    off = CommandAuthority(None, 0)
    assert off.refusal(StartUpload(upload_id="u", repository="a/b"), 0) is None
