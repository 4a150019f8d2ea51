"""Custody mode of the FABRIC broker (TOKENHUB_FABRIC_CUSTODY=true), as a
FABlib user meets it: no refresh token reaches the server (neither its
environment nor its token file), and the real FABlib in a kernel still gets
a FABRIC JWT, which tokenhub keeps fresh through the (stand-in) Credential
Manager by itself. The stack is test_fablib_broker.py's, in custody."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import Hub, log_in_and_spawn, remember
from test_fablib_broker import fabric_stack_running, finish, kernel, line_of, read_json
from test_local_user_file import assert_private, system_user  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="port 443, /etc/hosts and servers as users need root")


@pytest.fixture(scope="module")
def custody_stack(system_user):  # noqa: F811 (the imported fixture)
    with fabric_stack_running(system_user, TOKENHUB_FABRIC_CUSTODY="true") as s:
        yield s


def test_custody_keeps_refresh_tokens_out_and_fablib_gets_a_jwt(custody_stack, browser, system_user):  # noqa: F811
    stack, account, cm = custody_stack, system_user, custody_stack.cm
    hub = Hub(stack)
    context = browser.new_context()
    log_in_and_spawn(context.new_page(), stack, account.pw_name)
    env = hub.server_env(account.pw_name)
    remember(env["JUPYTERHUB_API_TOKEN"])
    assert "CILOGON_REFRESH_TOKEN" not in env, "no refresh token in the server's environment"
    path = Path(env["FABRIC_TOKEN_LOCATION"])
    # tokenhub gets the FABRIC JWT itself at once, and the file holds it alone.
    deadline = time.monotonic() + 30
    while (document := read_json(path)).get("comment") != "Created via API":
        assert time.monotonic() < deadline, f"no FABRIC JWT in the token file: {sorted(document)}"
        time.sleep(0.5)
    assert "refresh_token" not in document
    assert_private(str(path), account)
    remember(document["id_token"])

    # FABlib in a kernel: the JWT from the file, valid, signed by the CM; nothing to refresh with.
    proc = kernel(stack, account, env)
    got = line_of(proc)
    finish(proc)
    assert got == {"id_token": document["id_token"], "refresh_token": None}
    claims = cm.verify(got["id_token"])
    assert claims["exp"] > time.time()
    assert cm.stats()["answered"] == 1, "the kernel did not refresh (it cannot)"

    # tokenhub keeps it fresh: a refresh it makes (as keep-alive would)
    # reaches the file, still without a refresh token.
    from conftest import tokenhub_call

    status, forced, _ = tokenhub_call(stack, env["JUPYTERHUB_API_TOKEN"], "POST", "/api/v1/tokens/refresh")
    assert status == 200 and forced["refresh_token"] is None, forced
    deadline = time.monotonic() + 30
    while read_json(path).get("id_token") != forced["id_token"]:
        assert time.monotonic() < deadline, "the refreshed JWT did not reach the file"
        time.sleep(0.5)
    assert "refresh_token" not in read_json(path)
    remember(forced["id_token"])
    context.close()
