"""WLCG Bearer Token Discovery in a spawned server, as grid tools meet it:
the hub block sets BEARER_TOKEN_FILE in the server's environment (never
BEARER_TOKEN), tokenhub keeps that file holding a token for the second
resource server of the test IdP, and the real `scitokens` package from PyPI,
run as the user with the server's own environment, finds it
(`SciToken.discover`), verifies it against the IdP's published keys, and
after the token's lifetime has passed finds a fresh one without the notebook
doing anything. With LocalProcessSpawner (the hub as root, the user's own
account) the file is 0600 in a 0700 folder, owned by the user. An EOS-style
template file (`oauth2:<token>:<issuer>/userinfo`) follows the same token.

How close to production: scitokens is called with insecure=True because the
test IdP serves plain http on 127.0.0.1 (scitokens otherwise insists on an
https issuer); everything else (discovery, key set, signature, audience,
expiry) is scitokens' own check."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Hub, log_in_and_spawn, remember, start_stack
from test_local_user_file import assert_private, server_python, system_user  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the hub must run as root to start servers as users")

STORAGE = "https://storage.example"
TTL = 60


@pytest.fixture(scope="module")
def bearer_stack(system_user):  # noqa: F811 (the imported fixture)
    scratch = Path(tempfile.mkdtemp(prefix="tokenhub-python-"))
    scratch.chmod(0o755)
    python, pythonpath = server_python(system_user, scratch)
    state = Path(tempfile.mkdtemp(prefix="tokenhub-e2e-bearer-"))
    s = start_stack(
        state,
        access_token_ttl=TTL,
        extra_env={
            "HUB_SPAWNER": "local",
            "HUB_SERVER_PYTHON": python,
            "HUB_SERVER_PYTHONPATH": pythonpath,
            # The login asks for the storage resource and its scopes (RFC 8707).
            "TOKENHUB_OIDC_SCOPES": "openid email profile groups offline_access storage.read storage.modify",
            "TOKENHUB_OIDC_AUTH_PARAMS": f"resource={STORAGE}",
            "TOKENHUB_TOKEN_RULES": json.dumps(
                [{"name": "storage", "groups": ["*"], "scopes": ["storage.read"], "audiences": [STORAGE]}]
            ),
            "TOKENHUB_BEARER_TOKEN_AUDIENCE": STORAGE,
            "TOKENHUB_BEARER_TOKEN_SCOPE": "storage.read",
            "TOKENHUB_TOKEN_FILES": json.dumps(
                [
                    {
                        "path": ".tokenhub/eos_{server}",
                        "scope": "storage.read",
                        "audience": STORAGE,
                        "format": "template",
                        "template": "oauth2:{access_token}:{issuer}/userinfo",
                    }
                ]
            ),
            "TOKENHUB_KEEPALIVE_INTERVAL": "5",
        },
    )
    s.server_python = (python, pythonpath)
    yield s
    s.stop()
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)


DISCOVER = """
import json, scitokens
token = scitokens.SciToken.discover(audience="https://storage.example", insecure=True)
print(json.dumps({name: token[name] for name in ("sub", "scope", "aud", "exp", "jti", "iss")}))
"""


def discover(stack, account, env: dict) -> dict:
    """scitokens' discovery, run as the user with the server's environment."""
    python, pythonpath = stack.server_python
    run = subprocess.run(
        [python, "-c", DISCOVER],
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        env={**env, "PYTHONPATH": pythonpath, "HOME": account.pw_dir},
        cwd=account.pw_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def read_when(path: str, predicate, timeout: float = 60) -> str:
    """The file's text once `predicate` holds for it (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = Path(path).read_text()
            if predicate(text):
                return text
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, f"{path} did not come as expected"
        time.sleep(0.5)


def eos_follows(stack, bearer: str, eos: str, timeout: float = 30) -> str:
    """Waits until the EOS file holds the bearer file's token, in its
    template; returns that token."""
    deadline = time.monotonic() + timeout
    while True:
        token = Path(bearer).read_text().strip()
        if Path(eos).exists() and Path(eos).read_text() == f"oauth2:{token}:{stack.idp_url}/userinfo":
            return token
        assert time.monotonic() < deadline, "the EOS file does not hold the bearer token"
        time.sleep(0.5)


def test_scitokens_finds_a_fresh_token_through_bearer_token_file(bearer_stack, browser, system_user):  # noqa: F811
    stack, account = bearer_stack, system_user
    hub = Hub(stack)
    context = browser.new_context()
    log_in_and_spawn(context.new_page(), stack, account.pw_name)
    env = hub.server_env(account.pw_name)
    remember(env["JUPYTERHUB_API_TOKEN"], env["CILOGON_REFRESH_TOKEN"])
    assert "BEARER_TOKEN" not in env, "BEARER_TOKEN would shadow every renewal"
    path = env["BEARER_TOKEN_FILE"]
    assert path == os.path.join(account.pw_dir, ".tokenhub", "bt_default")

    first_text = read_when(path, lambda t: t.strip() != "")
    remember(first_text.strip())
    assert_private(path, account)
    folder = os.lstat(os.path.dirname(path))
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == account.pw_uid

    first = discover(stack, account, env)
    assert (first["sub"], first["scope"], first["aud"]) == (account.pw_name, "storage.read", STORAGE), first
    assert first["iss"] == stack.idp_url
    eos = os.path.join(account.pw_dir, ".tokenhub", "eos_default")
    eos_follows(stack, path, eos)
    assert_private(eos, account)

    # The token's lifetime passes; the notebook does nothing.
    time.sleep(max(0, first["exp"] - time.time()) + 2)
    second = discover(stack, account, env)
    assert second["jti"] != first["jti"] and second["exp"] > time.time(), (first, second)
    assert second["sub"] == account.pw_name
    assert_private(path, account)
    remember(eos_follows(stack, path, eos))
    assert Path(path).read_text().strip() != first_text.strip()
    context.close()
    hub.stop_server(account.pw_name)
