"""Fixtures for the interoperability tests: a second, independent OpenID
provider (django-oauth-toolkit, tests/interop/idp) and the real tokenhub
binary, both on 127.0.0.1, and a requests session that navigates like a
browser (redirects followed one by one, Fetch Metadata headers sent)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKENHUB_BIN = Path(os.environ.get("TOKENHUB_BIN", ROOT / "target" / "debug" / "tokenhub"))

# tokenhub's client secret at the IdP. RFC 6749 §2.3.1 wants client_secret_basic
# credentials form-encoded before base64; with `+`, `~`, `/` and `=` in the
# secret a client that skips the encoding sends a different secret (`+`
# decodes to a space), and django-oauth-toolkit, which decodes with
# unquote_plus, answers invalid_client.
CLIENT_SECRET = "tk+" + secrets.token_urlsafe(24) + "~/=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, what: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def clean_env() -> dict:
    """This process's environment without settings of tokenhub, the hub or an IdP."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TOKENHUB_", "JUPYTERHUB_", "IDP_"))}


@dataclass
class Idp:
    """The django-oauth-toolkit provider."""

    url: str
    client_id: str
    client_secret: str
    log: Path

    @property
    def issuer(self) -> str:
        return f"{self.url}/o"

    def discovery(self) -> dict:
        return requests.get(f"{self.issuer}/.well-known/openid-configuration", timeout=10).json()

    def jwks(self) -> dict:
        return requests.get(f"{self.issuer}/.well-known/jwks.json", timeout=10).json()

    def rotate_key(self) -> dict:
        r = requests.post(f"{self.url}/_test/rotate-key", timeout=30)
        r.raise_for_status()
        return r.json()

    def record(self) -> dict:
        return requests.get(f"{self.url}/_test/record", timeout=10).json()

    def token_requests(self) -> list[dict]:
        return self.record()["token_requests"]

    def jwks_fetches_by_others(self) -> int:
        """Fetches of the key set by anyone but this test (it uses requests)."""
        return sum(
            1 for f in self.record()["jwks_fetches"] if not (f["user_agent"] or "").startswith("python-requests/")
        )

    def client_auth(self) -> tuple[str, str]:
        """Basic credentials as RFC 6749 §2.3.1 says (requests base64-encodes them)."""
        quote = urllib.parse.quote_plus
        return quote(self.client_id), quote(self.client_secret)


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tokenhub-interop-"))


@pytest.fixture(scope="session")
def tokenhub_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def idp(state_dir, tokenhub_port):
    port = free_port()
    log = state_dir / "idp.log"
    env = {
        **clean_env(),
        "IDP_PORT": str(port),
        "IDP_STATE_DIR": str(state_dir / "idp"),
        "IDP_TEST_CONTROL": "1",
        "IDP_CLIENT_ID": "tokenhub",
        "IDP_CLIENT_SECRET": CLIENT_SECRET,
        "IDP_REDIRECT_URIS": f"http://127.0.0.1:{tokenhub_port}/callback",
        "IDP_ACCESS_TOKEN_TTL": "300",
        "PYTHONUNBUFFERED": "1",
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "idp" / "serve.py")],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    idp = Idp(url=f"http://127.0.0.1:{port}", client_id="tokenhub", client_secret=CLIENT_SECRET, log=log)
    try:
        wait_for(f"{idp.issuer}/.well-known/openid-configuration", "the django-oauth-toolkit IdP", proc, log)
        yield idp
    finally:
        stop(proc)


@dataclass
class Tokenhub:
    """The tokenhub process: its URL, log file and SQLite file."""

    url: str
    log: Path
    database: Path
    crypt_key: str
    proc: subprocess.Popen = field(repr=False)


@pytest.fixture(scope="session")
def tokenhub(idp, state_dir, tokenhub_port):
    if not TOKENHUB_BIN.is_file():
        pytest.fail(f"no tokenhub binary at {TOKENHUB_BIN}: run `cargo build --bin tokenhub` or set TOKENHUB_BIN")
    crypt_key = subprocess.run([str(TOKENHUB_BIN), "keygen"], check=True, capture_output=True, text=True).stdout.strip()
    database = state_dir / "tokenhub.sqlite"
    log = state_dir / "tokenhub.log"
    url = f"http://127.0.0.1:{tokenhub_port}"
    env = {
        **clean_env(),
        "TOKENHUB_BIND": f"127.0.0.1:{tokenhub_port}",
        "TOKENHUB_PUBLIC_URL": url,
        "TOKENHUB_OIDC_ISSUER": idp.issuer,
        "TOKENHUB_OIDC_CLIENT_ID": idp.client_id,
        "TOKENHUB_OIDC_CLIENT_SECRET": idp.client_secret,
        # What this provider offers; it issues refresh tokens without offline_access.
        "TOKENHUB_OIDC_SCOPES": "openid profile email",
        # No hub takes part: the hub's client is a placeholder.
        "TOKENHUB_HUB_CLIENT_ID": "jupyterhub",
        "TOKENHUB_HUB_CLIENT_SECRET": secrets.token_urlsafe(24),
        "TOKENHUB_HUB_REDIRECT_URI": "http://127.0.0.1:9/hub/oauth_callback",
        "TOKENHUB_DATABASE_URL": f"sqlite://{database}?mode=rwc",
        "TOKENHUB_CRYPT_KEY": crypt_key,
        # Debug lines too, so the secrets check covers everything tokenhub can say.
        "TOKENHUB_LOG": "info,tokenhub=debug",
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(TOKENHUB_BIN), "serve"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        wait_for(f"{url}/healthz", "tokenhub", proc, log)
        yield Tokenhub(url=url, log=log, database=database, crypt_key=crypt_key, proc=proc)
    finally:
        stop(proc)


def origin(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


class Browser:
    """A requests session that navigates as a browser does: it follows
    redirects itself (so every hop is seen), sends the Fetch Metadata
    headers of a top-level navigation, and keeps cookies."""

    def __init__(self):
        self.session = requests.Session()
        self.hops: list[str] = []  # every URL visited, in order

    @staticmethod
    def _site(target: str, initiator: str | None) -> str:
        if initiator is None:
            return "none"  # typed into the address bar
        if origin(target) == initiator:
            return "same-origin"
        # Every party here is on 127.0.0.1: one site, several origins.
        same_host = urllib.parse.urlsplit(target).hostname == urllib.parse.urlsplit(initiator).hostname
        return "same-site" if same_host else "cross-site"

    def navigate(self, url: str, method: str = "GET", data: dict | None = None,
                 initiator: str | None = None, max_hops: int = 10) -> requests.Response:
        """Opens `url` (a typed URL when `initiator` is None, else a link or
        form on the `initiator` origin) and follows redirects to the page."""
        for _ in range(max_hops):
            self.hops.append(url)
            headers = {
                "Sec-Fetch-Mode": "navigate",
                "Sec-Fetch-Dest": "document",
                "Sec-Fetch-Site": self._site(url, initiator),
                "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
            }
            if method == "POST" and initiator is not None:
                headers["Origin"] = initiator
            r = self.session.request(method, url, data=data, headers=headers, allow_redirects=False, timeout=60)
            if r.status_code not in (301, 302, 303, 307, 308):
                return r
            next_url = urllib.parse.urljoin(url, r.headers["Location"])
            if r.status_code in (301, 302, 303):
                method, data = "GET", None
            url = next_url
        raise AssertionError(f"more than {max_hops} redirects: {self.hops[-max_hops:]}")


@pytest.fixture(scope="session")
def browser():
    return Browser()
