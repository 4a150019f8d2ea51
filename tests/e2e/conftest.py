"""Fixtures for the end-to-end tests: the real stack (oidc-provider, JupyterHub
with configurable-http-proxy, tokenhub as a managed service, local-process
servers) and Debian's chromium driven by Playwright."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hub"))

from stack import Stack, free_port  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="session")
def stack():
    state = Path(tempfile.mkdtemp(prefix="tokenhub-e2e-"))
    s = start_stack(
        state,
        # Short-lived access tokens, so that refreshes happen within the tests.
        access_token_ttl=120,
        extra_env={
            # The audit log in a file of its own (checked by test_zz_secrets).
            "TOKENHUB_AUDIT_LOG": str(state / "audit.jsonl"),
            # A second OAuth client at the hub (test_security).
            "HUB_TEST_OAUTH_CLIENT_SECRET": secrets.token_hex(24),
            "HUB_TEST_OAUTH_CLIENT_REDIRECT": f"http://127.0.0.1:{free_port()}/e2e-other-client/oauth_callback",
            # Shares added to running servers are seen within 2 s (test_custody).
            "TOKENHUB_SHARE_CHECK_INTERVAL": "2",
        },
    )
    yield s
    s.stop()


def start_stack(state: Path, **settings) -> Stack:
    """The whole stack on free ports, state in `state`; on a failed start,
    the hub's and the IdP's logs are printed and everything is stopped."""
    s = Stack(
        state_dir=state,
        hub_port=free_port(),
        hub_api_port=free_port(),
        proxy_api_port=free_port(),
        idp_port=free_port(),
        tokenhub_port=free_port(),
        tokenhub_bin=Path(os.environ.get("TOKENHUB_BIN", ROOT / "target" / "debug" / "tokenhub")),
        **settings,
    )
    try:
        s.start()
    except Exception:
        s.stop()
        for log in (s.hub_log, s.idp_log):
            if log.exists():
                print(log.read_text()[-5000:], file=sys.stderr)
        raise
    return s


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Hub:
    """The hub's REST API as an admin service, plus helpers on servers."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def api(self, method: str, path: str, token: str | None = None):
        req = urllib.request.Request(
            f"{self.stack.hub_url}/hub/api{path}",
            method=method,
            headers={"Authorization": f"token {token or self.stack.admin_token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return json.loads(body) if body else None

    def server_pid(self, user: str) -> int:
        model = self.api("GET", f"/users/{user}")
        return model["servers"][""]["state"]["pid"]

    def server_env(self, user: str) -> dict:
        raw = Path(f"/proc/{self.server_pid(user)}/environ").read_bytes()
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)

    def personal_token(self, user: str, scopes: list[str]) -> str:
        """A token created through the hub's REST API, as a user does on the
        hub's token page (here by the test's admin service, which holds `tokens`)."""
        req = urllib.request.Request(
            f"{self.stack.hub_url}/hub/api/users/{user}/tokens",
            method="POST",
            data=json.dumps({"scopes": scopes, "note": "e2e", "expires_in": 600}).encode(),
            headers={"Authorization": f"token {self.stack.admin_token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["token"]

    def stop_server(self, user: str) -> None:
        try:
            self.api("DELETE", f"/users/{user}/server")
        except urllib.error.HTTPError as e:
            if e.code != 204:
                raise
        deadline = time.monotonic() + 60
        while self.api("GET", f"/users/{user}")["servers"]:
            assert time.monotonic() < deadline, "server did not stop"
            time.sleep(0.5)


@pytest.fixture(scope="session")
def hub(stack):
    return Hub(stack)


def log_in_and_spawn(page, stack: Stack, user: str) -> None:
    """The browser opens the hub, goes through tokenhub to the IdP, signs in
    and lands in its running server."""
    page.goto(f"{stack.hub_url}/hub/")
    _sign_in(page, stack, user)
    page.wait_for_url(re.compile(rf".*/user/{re.escape(user)}/lab.*"), timeout=120_000)


def log_in(page, stack: Stack, user: str) -> None:
    """Signs in as `log_in_and_spawn` does but stays on the hub's home page:
    the user has no server."""
    page.goto(f"{stack.hub_url}/hub/login?next=%2Fhub%2Fhome")
    _sign_in(page, stack, user)
    page.wait_for_url(re.compile(r".*/hub/home.*"), timeout=60_000)


def wait_for_text(page, text: str, timeout: int = 30_000) -> None:
    """Waits for `text` on the page; when it does not come, fails naming
    the page the browser is on and what it shows."""
    try:
        page.wait_for_selector(f"text={text}", timeout=timeout)
    except Exception as e:  # Playwright's TimeoutError
        try:
            shown = page.inner_text("body")[:1500]
        except Exception as inner:  # the page is gone or navigating
            shown = f"(unreadable: {inner})"
        raise AssertionError(f"{text!r} did not appear in {timeout} ms; the browser is at {page.url}: {shown!r}") from e


def _sign_in(page, stack: Stack, user: str) -> None:
    page.click("a:has-text('Sign in with')")
    if page.url.startswith(stack.idp_url):  # no IdP session yet: the login form
        page.fill("#login", user)
        page.fill("#password", "anything")
        page.click("#submit")


def tokenhub_call(stack: Stack, server_api_token: str, method: str, path: str, body: dict | None = None):
    """Calls tokenhub through the proxy as code in the server would; returns
    (status, JSON body, headers)."""
    req = urllib.request.Request(
        f"{stack.tokenhub_url}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"token {server_api_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def tokenhub_tokens(stack: Stack, server_api_token: str, query: str = "") -> dict:
    status, body, _ = tokenhub_call(stack, server_api_token, "GET", f"/api/v1/tokens{query}")
    assert status == 200, body
    return body


def idp_stats(stack: Stack, account: str) -> dict:
    """The IdP's counters for `account`: grants answered by type, and `revoked`."""
    with urllib.request.urlopen(f"{stack.idp_url}/_test/stats?account={account}", timeout=10) as r:
        return json.loads(r.read())


def idp_refreshes(stack: Stack, account: str) -> int:
    """Refresh-token grants the IdP has answered for `account`."""
    return idp_stats(stack, account)["refresh_token"]


def jwt_payload(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def wait_for_file(path: str, predicate, timeout: float = 30) -> dict:
    """Reads the token file with FABlib's own reader until `predicate(document)` holds."""
    from fabrictestbed.external_api.credmgr_client import CredmgrClient

    deadline = time.monotonic() + timeout
    document = {}
    while time.monotonic() < deadline:
        try:
            document = CredmgrClient.load_file(path)
        except (OSError, ValueError):
            document = {}
        if document and predicate(document):
            return document
        time.sleep(0.25)
    raise AssertionError(f"{path} did not reach the expected state in {timeout}s: {sorted(document)}")


# Every token value a test saw, for the final check of the logs.
SEEN_TOKENS: set[str] = set()


def remember(*values) -> None:
    SEEN_TOKENS.update(v for v in values if isinstance(v, str) and len(v) >= 16)


def leaked(tokens, where: str | bytes) -> list[str]:
    """The tokens (their first characters only) that stand in `where`."""
    return [t[:6] + "…" for t in tokens if (t if isinstance(where, str) else t.encode()) in where]


def stack_logs(stack: Stack, *more: Path) -> str:
    """The hub's log (tokenhub's, the proxy's and the servers' output too),
    the IdP's, and `more` files."""
    return "".join(path.read_text() for path in (stack.hub_log, stack.idp_log, *more))


def vault_bytes(stack: Stack) -> bytes:
    """tokenhub's SQLite database with its write-ahead log, as stored."""
    return b"".join(path.read_bytes() for path in sorted(stack.state_dir.glob("tokenhub.sqlite*")))


# What an attacker puts in their own home: every request's Authorization
# header, and the token files written into the server, go to a file of theirs.
RECORDER = '''
import json, os
from jupyter_server.log import log_request as _log_request

def _record(handler):
    record = {"server": os.environ.get("JUPYTERHUB_SERVER_NAME", ""),
              "path": handler.request.path, "method": handler.request.method,
              "authorization": handler.request.headers.get("Authorization", "")}
    if handler.request.method == "PUT" and handler.request.path.endswith(".tokens.json"):
        try:
            record["refresh_token"] = json.loads(json.loads(handler.request.body)["content"]).get("refresh_token")
        except Exception:
            pass
    with open(os.path.join(os.path.expanduser("~"), "recorded.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\\n")
    _log_request(handler)

c.ServerApp.tornado_settings = {"log_function": _record}
'''


def home(stack, user: str) -> Path:
    return stack.state_dir / "hub" / "home" / user


def plant_recorder(stack, user: str) -> Path:
    config = home(stack, user) / ".jupyter"
    config.mkdir(parents=True, exist_ok=True)
    (config / "jupyter_server_config.py").write_text(RECORDER)
    return home(stack, user) / "recorded.jsonl"


def recorded(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def credentials_owned_by(stack, records: list[dict]) -> dict[str, str]:
    """Each Authorization a recorder saw, with the hub user its token belongs to."""
    owners = {}
    for credential in {r["authorization"] for r in records if r["authorization"]}:
        request = urllib.request.Request(f"{stack.hub_url}/hub/api/user", headers={"Authorization": credential})
        with urllib.request.urlopen(request, timeout=30) as r:
            owners[credential] = json.loads(r.read())["name"]
    return owners
