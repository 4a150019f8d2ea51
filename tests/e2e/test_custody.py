"""Custody in the real stack, tried as an attacker on a shared hub would:
a user's server records every credential that reaches it (a
jupyter_server_config.py in that user's home, as anyone can write one) and
none of them reaches another user's server or tokens; a second IdP subject
naming an existing user is refused until an operator moves the name; names
are what the hub makes of them (`Corin` signs in and spawns as `corin`,
`a b` and `a+b` get their own files); 100 concurrent forced refreshes of a
user with two servers leave both files current, each written forward only."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import (
    credentials_owned_by,
    home,
    log_in,
    plant_recorder,
    recorded,
    remember,
    tokenhub_call,
    tokenhub_tokens,
    wait_for_file,
    wait_for_text,
)

def signed_in(browser, stack, account: str):
    """A browser context signed in to the hub as IdP `account` (no server)."""
    context = browser.new_context()
    log_in(context.new_page(), stack, account)
    return context


def start_server(hub, user: str, name: str = "") -> dict:
    """Starts a server through the hub's API (the spawn hook runs as for a
    click) and waits until it is ready; returns its environment."""
    quoted = urllib.parse.quote(user, safe="")
    path = f"/users/{quoted}/servers/{urllib.parse.quote(name)}" if name else f"/users/{quoted}/server"
    try:
        hub.api("POST", path)
    except urllib.error.HTTPError as e:
        assert e.code in (201, 202), e.code
    deadline = time.monotonic() + 120
    while True:
        server = hub.api("GET", f"/users/{quoted}")["servers"].get(name)
        if server and server["ready"]:
            break
        assert time.monotonic() < deadline, f"{user}/{name} did not start"
        time.sleep(0.5)
    pid = server["state"]["pid"]
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    remember(env["JUPYTERHUB_API_TOKEN"], env.get("CILOGON_REFRESH_TOKEN"))
    return env


def call(url: str, method: str, authorization: str, body: dict | None = None) -> int:
    """The status a request with this Authorization (and JSON body) gets."""
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": authorization, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_nothing_a_server_receives_reaches_another_users_server_or_tokens(stack, browser, hub):
    recording = plant_recorder(stack, "mallet")
    contexts = [signed_in(browser, stack, "mallet"), signed_in(browser, stack, "victor")]
    mallet = start_server(hub, "mallet")
    victor = start_server(hub, "victor")
    token = mallet["JUPYTERHUB_API_TOKEN"]
    wait_for_file(mallet["FABRIC_TOKEN_LOCATION"], lambda d: d["refresh_token"] == mallet["CILOGON_REFRESH_TOKEN"])
    for _ in range(3):  # forced refreshes: each one rewrites the file
        status, body, _ = tokenhub_call(stack, token, "POST", "/api/v1/tokens/refresh")
        assert status == 200, body
        remember(body["access_token"], body["refresh_token"])
        wait_for_file(mallet["FABRIC_TOKEN_LOCATION"], lambda d, r=body["refresh_token"]: d["refresh_token"] == r)
    # The server logs a request after answering it: wait (bounded) for the lines.
    deadline = time.monotonic() + 10
    while len([r for r in recorded(recording) if r["method"] == "PUT" and r["path"].endswith(".tokens.json")]) < 4:
        assert time.monotonic() < deadline, "the spawn's file and one per forced refresh were recorded"
        time.sleep(0.2)
    credentials = {r["authorization"] for r in recorded(recording) if r["authorization"]}
    assert credentials, "the recorder saw credentials"
    victor_file = f"{stack.hub_url}/user/victor/api/contents/.tokens.json"
    for credential, owner in credentials_owned_by(stack, recorded(recording)).items():
        # Each is mallet's own server token: the hub says so, it opens no
        # other user's server, and tokenhub gives it only mallet's tokens.
        assert owner == "mallet", owner
        assert call(victor_file, "GET", credential) in (302, 403, 404), "reached victor's server"
        status, body, _ = tokenhub_call(stack, credential.split(" ", 1)[1], "GET", "/api/v1/tokens")
        assert status != 200 or body["user"] == "mallet"
    assert mallet["JUPYTERHUB_API_TOKEN"] in {c.split(" ", 1)[1] for c in credentials}
    assert victor["JUPYTERHUB_API_TOKEN"] not in str(credentials)
    for context in contexts:
        context.close()
    for user in ("mallet", "victor"):
        hub.stop_server(user)


def test_a_second_subject_is_refused_until_an_operator_moves_the_name(stack, browser, hub):
    owner = signed_in(browser, stack, "wren")
    wren = start_server(hub, "wren")
    before = tokenhub_tokens(stack, wren["JUPYTERHUB_API_TOKEN"])
    remember(before["access_token"], before["refresh_token"])
    # Another IdP account that calls itself "wren": refused at the hub's login and at /login.
    for start in (f"{stack.hub_url}/hub/login?next=%2Fhub%2Fhome", f"{stack.tokenhub_url}/login"):
        context = browser.new_context()
        page = context.new_page()
        page.goto(start)
        if "/hub/login" in start:
            page.click("a:has-text('Sign in with')")
        page.fill("#login", "imposter~wren")
        page.fill("#password", "anything")
        page.click("#submit")
        wait_for_text(page, "belongs to someone else")
        assert "imposter~wren" in page.content(), "the page tells the person their subject"
        context.close()
    after = tokenhub_tokens(stack, wren["JUPYTERHUB_API_TOKEN"])
    assert after["refresh_token"] == before["refresh_token"], "wren's lineage untouched"
    assert hub.api("GET", "/users/wren")["name"] == "wren"

    # An admin moves the name; then the new subject signs in as wren.
    admin = signed_in(browser, stack, "admin-amy")
    admin_token = hub.personal_token("admin-amy", ["access:services!service=tokenhub"])
    request = urllib.request.Request(
        f"{stack.tokenhub_url}/api/v1/admin/names/wren",
        method="POST",
        data=json.dumps({"subject": "imposter~wren"}).encode(),
        headers={"Authorization": f"token {admin_token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["previous_subject"] == "wren"
    newcomer = signed_in(browser, stack, "imposter~wren")
    status, body, _ = tokenhub_call(stack, wren["JUPYTERHUB_API_TOKEN"], "GET", "/api/v1/tokens")
    assert status == 200 and body["refresh_token"] != before["refresh_token"], "the name's tokens are the new subject's"
    for context in (owner, admin, newcomer):
        context.close()
    hub.stop_server("wren")


def test_mixed_case_and_look_alike_names_are_the_hubs_names(stack, browser, hub):
    alike = signed_in(browser, stack, "kate")
    kate = tokenhub_tokens(stack, start_server(hub, "kate")["JUPYTERHUB_API_TOKEN"])
    # `\u212aate` (Kelvin sign) is kate to the hub: refused, kate untouched.
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{stack.hub_url}/hub/login?next=%2Fhub%2Fhome")
    page.click("a:has-text('Sign in with')")
    page.fill("#login", "kelvin~%E2%84%AAate")
    page.fill("#password", "anything")
    page.click("#submit")
    wait_for_text(page, "belongs to someone else")
    context.close()
    assert tokenhub_tokens(stack, hub.server_env("kate")["JUPYTERHUB_API_TOKEN"])["refresh_token"] == kate["refresh_token"]
    # One person whose IdP name is `Corin` signs in and spawns as corin.
    corin_browser = signed_in(browser, stack, "corin~Corin")
    corin = start_server(hub, "corin")
    assert tokenhub_tokens(stack, corin["JUPYTERHUB_API_TOKEN"])["user"] == "corin"
    for c in (alike, corin_browser):
        c.close()
    hub.stop_server("kate")
    hub.stop_server("corin")


def test_users_a_b_and_a_plus_b_each_get_their_own_file(stack, browser, hub):
    contexts = [signed_in(browser, stack, "ab1~a%20b"), signed_in(browser, stack, "ab2~a%2Bb")]
    for user in ("a b", "a+b"):
        env = start_server(hub, user)
        own = tokenhub_tokens(stack, env["JUPYTERHUB_API_TOKEN"])
        assert own["user"] == user
        remember(own["refresh_token"])
        document = wait_for_file(env["FABRIC_TOKEN_LOCATION"], lambda d, r=own["refresh_token"]: d["refresh_token"] == r)
        assert Path(env["FABRIC_TOKEN_LOCATION"]).parent == home(stack, user)
        assert document["refresh_token"] == own["refresh_token"]
    a_b = json.loads((home(stack, "a b") / ".tokens.json").read_text())["refresh_token"]
    a_plus_b = json.loads((home(stack, "a+b") / ".tokens.json").read_text())["refresh_token"]
    assert a_b != a_plus_b
    for context in contexts:
        context.close()
    for user in ("a b", "a+b"):
        hub.stop_server(urllib.parse.quote(user, safe=""))


def test_concurrent_forced_refreshes_leave_both_servers_files_current_and_forward_only(stack, browser, hub):
    recordings = plant_recorder(stack, "tess")
    context = signed_in(browser, stack, "tess")
    default = start_server(hub, "tess")
    other = start_server(hub, "tess", "second")
    token = default["JUPYTERHUB_API_TOKEN"]

    def force(_):
        return tokenhub_call(stack, token, "POST", "/api/v1/tokens/refresh")[0]

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(force, range(100)))
    assert all(s == 200 for s in statuses), sorted(set(statuses))
    current = tokenhub_tokens(stack, token)
    remember(current["access_token"], current["refresh_token"])
    for env in (default, other):
        wait_for_file(env["FABRIC_TOKEN_LOCATION"], lambda d: d["refresh_token"] == current["refresh_token"], timeout=10)
    # tokenhub's log: per server, the versions written only go up.
    log = stack.hub_log.read_text()
    for server in ("", "second"):
        versions = [
            int(m.group(1))
            for m in re.finditer(rf'token file written user=tess server={re.escape(server)} version=(\d+)', log)
        ]
        assert versions and versions == sorted(set(versions)), f"server {server!r}: {versions}"
    # And the server itself never received an older refresh token again (a
    # rewrite with the same one and its newly verified ID token may follow).
    def received_by(server):
        tokens = [r["refresh_token"] for r in recorded(recordings) if r.get("refresh_token") and r["server"] == server]
        return [t for i, t in enumerate(tokens) if i == 0 or tokens[i - 1] != t]

    for server in ("", "second"):
        # The server logs a request after answering it: wait for the last line.
        deadline = time.monotonic() + 10
        while not received_by(server) or received_by(server)[-1] != current["refresh_token"]:
            assert time.monotonic() < deadline, f"server {server!r} did not log the current file"
            time.sleep(0.2)
        received = received_by(server)
        assert len(received) == len(set(received)), f"server {server!r} received an older refresh token again"
    context.close()
    try:
        hub.api("DELETE", "/users/tess/servers/second")
    except urllib.error.HTTPError as e:
        assert e.code in (202, 204), e.code
    hub.stop_server("tess")


def hub_call(stack, method: str, path: str, body: dict | None = None) -> int:
    """The hub's REST API as the tests' admin service, with a JSON body."""
    return call(f"{stack.hub_url}/hub/api{path}", method, f"token {stack.admin_token}", body)


def test_a_shared_server_gets_no_tokens_while_shared_and_gets_them_back_after(stack, browser, hub):
    contexts = [signed_in(browser, stack, "rex"), signed_in(browser, stack, "sharon")]
    sharon = start_server(hub, "sharon")
    token, path = sharon["JUPYTERHUB_API_TOKEN"], sharon["FABRIC_TOKEN_LOCATION"]
    wait_for_file(path, lambda d: d.get("refresh_token") == sharon["CILOGON_REFRESH_TOKEN"])

    # sharon shares her server with rex (JupyterHub's sharing API).
    assert hub_call(stack, "POST", "/shares/sharon/", {"user": "rex"}) == 200
    # (Read until whole: Jupyter's "atomic" writing rewrites the file in place.)
    note = wait_for_file(path, lambda d: "refresh_token" not in d and d.get("state") == "Withheld")
    assert "shared" in note["comment"]
    status, body, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
    assert status == 403 and body["error"] == "access_denied" and "shared" in body["error_description"]
    page = contexts[1].new_page()
    page.goto(f"{stack.tokenhub_url}/")
    assert "default server" in page.inner_text("#withheld")

    # The last share goes: the tokens come back, file and API.
    assert hub_call(stack, "DELETE", "/shares/sharon/") == 204
    current = None
    deadline = time.monotonic() + 30
    while current is None:
        status, body, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
        if status == 200:
            current = body
        else:
            assert time.monotonic() < deadline, body
            time.sleep(0.5)
    remember(current["access_token"], current["refresh_token"])
    wait_for_file(path, lambda d: d.get("refresh_token") == current["refresh_token"])
    for context in contexts:
        context.close()
    hub.stop_server("sharon")
