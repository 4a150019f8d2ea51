"""Start the whole tokenhub stack on 127.0.0.1: the test identity provider
(npm oidc-provider), JupyterHub with configurable-http-proxy, and tokenhub as
a hub-managed service. Used by the demo (`scripts/demo.sh`) and by the
end-to-end tests.

    python hub/stack.py demo     # fixed ports, prints the URL, Ctrl-C stops all
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now and outside the kernel's range for outgoing
    connections: a port handed out for binding later (a redirect URI the hub
    is configured with at start, bound by a test much later) must not be
    taken meanwhile by some connection's local end."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 32768) if not low <= p <= high] or list(range(high + 1, 65536))
    for port in random.sample(candidates, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port outside the ephemeral range")


def wait_for_http(url: str, what: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:  # refused, or an error status while things come up
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout}s")


@dataclass
class Stack:
    """The running parts, their addresses and where their logs go."""

    state_dir: Path
    hub_port: int = 8000
    hub_api_port: int = 8081
    proxy_api_port: int = 8001
    idp_port: int = 9000
    tokenhub_port: int = 8090
    access_token_ttl: int = 3600
    tokenhub_bin: Path = ROOT / "target" / "debug" / "tokenhub"
    extra_env: dict = field(default_factory=dict)
    idp_env: dict = field(default_factory=dict)  # IDP_* settings for idp/server.mjs
    hub_client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    idp_client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    crypt_key: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_token: str = field(default_factory=lambda: secrets.token_hex(24))
    procs: list = field(default_factory=list)

    @property
    def hub_url(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    @property
    def idp_url(self) -> str:
        return f"http://127.0.0.1:{self.idp_port}"

    @property
    def tokenhub_url(self) -> str:
        return f"{self.hub_url}/services/tokenhub"

    @property
    def hub_log(self) -> Path:
        return self.state_dir / "jupyterhub.log"

    @property
    def idp_log(self) -> Path:
        return self.state_dir / "idp.log"

    def _spawn(self, args, env, log: Path, cwd=ROOT) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def start(self) -> "Stack":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENHUB_", "JUPYTERHUB_", "IDP_"))}
        # Servers run `jupyterhub-singleuser` from this Python's environment.
        base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
        self._idp_env = {
            **base,
            "IDP_PORT": str(self.idp_port),
            "IDP_STATE_DIR": str(self.state_dir / "idp"),
            "IDP_CLIENT_ID": "tokenhub",
            "IDP_CLIENT_SECRET": self.idp_client_secret,
            "IDP_REDIRECT_URIS": f"{self.tokenhub_url}/callback",
            "IDP_ACCESS_TOKEN_TTL": str(self.access_token_ttl),
            "IDP_TEST_CONTROL": "1",
            **self.idp_env,
        }
        self.start_idp()

        env = {
            **base,
            "HUB_STATE_DIR": str(self.state_dir / "hub"),
            "HUB_PORT": str(self.hub_port),
            "HUB_API_PORT": str(self.hub_api_port),
            "HUB_PROXY_API_PORT": str(self.proxy_api_port),
            "HUB_TEST_ADMIN_TOKEN": self.admin_token,
            "JUPYTERHUB_CRYPT_KEY": self.crypt_key,
            "TOKENHUB_PUBLIC_URL": self.tokenhub_url,
            "TOKENHUB_INTERNAL_URL": f"http://127.0.0.1:{self.tokenhub_port}/services/tokenhub",
            "TOKENHUB_SERVICE_URL": f"http://127.0.0.1:{self.tokenhub_port}",
            "TOKENHUB_SERVICE_COMMAND": str(self.tokenhub_bin),
            "TOKENHUB_HUB_CLIENT_ID": "jupyterhub",
            "TOKENHUB_HUB_CLIENT_SECRET": self.hub_client_secret,
            "TOKENHUB_HUB_REDIRECT_URI": f"{self.hub_url}/hub/oauth_callback",
            "TOKENHUB_OIDC_ISSUER": self.idp_url,
            "TOKENHUB_OIDC_CLIENT_ID": "tokenhub",
            "TOKENHUB_OIDC_CLIENT_SECRET": self.idp_client_secret,
            "TOKENHUB_OIDC_SCOPES": "openid email profile groups offline_access",
            "TOKENHUB_DATABASE_URL": f"sqlite://{self.state_dir / 'tokenhub.sqlite'}?mode=rwc",
            "TOKENHUB_ALLOW_ALL": "true",
            "TOKENHUB_ADMIN_GROUPS": "admins",
            "TOKENHUB_LOGIN_SERVICE": "the test IdP",
            **self.extra_env,
        }
        hub = self._spawn(
            [sys.executable, "-m", "jupyterhub", "-f", str(ROOT / "jupyterhub_config.py")], env, self.hub_log
        )
        wait_for_http(f"{self.hub_url}/hub/health", "JupyterHub", timeout=90, proc=hub)
        wait_for_http(f"{self.tokenhub_url}/healthz", "tokenhub behind the proxy", timeout=60, proc=hub)
        return self

    def start_idp(self) -> None:
        """Starts the identity provider (again: its keys and grants are kept
        in the state directory)."""
        self.idp = self._spawn(["node", str(ROOT / "idp" / "server.mjs")], self._idp_env, self.idp_log)
        wait_for_http(f"{self.idp_url}/.well-known/openid-configuration", "the identity provider", proc=self.idp)

    def stop_idp(self) -> None:
        """Stops the identity provider, as an outage would."""
        self.idp.terminate()
        self.idp.wait(timeout=20)
        self.procs.remove(self.idp)

    def stop(self) -> None:
        """Stops everything: the hub first (it stops the servers, tokenhub
        and the proxy), then whatever is left."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # children left in its group
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        # The proxy runs in a session of its own: stop it by its pid file.
        pid_file = self.state_dir / "hub" / "proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        self.procs.clear()


def demo() -> None:
    state = Path(os.environ.get("DEMO_STATE_DIR", ROOT / ".demo"))
    stack = Stack(state_dir=state, tokenhub_bin=Path(os.environ.get("TOKENHUB_BIN", ROOT / "target" / "debug" / "tokenhub")))
    print("starting the identity provider, JupyterHub and tokenhub …", flush=True)
    try:
        stack.start()
    except Exception as e:
        print(f"start failed: {e}\nlogs: {stack.idp_log} {stack.hub_log}", file=sys.stderr)
        stack.stop()
        sys.exit(1)
    print(
        f"""
tokenhub demo is running.

  Open   {stack.hub_url}/   and sign in with any user name (e.g. alice; admin* users are admins,
         operator* users may call tokenhub's operator API).
  Your tokens in tokenhub:   {stack.tokenhub_url}/
  After "invalid grant":     {stack.tokenhub_url}/refresh
  Logs:  {stack.hub_log}  and  {stack.idp_log}

Ctrl-C stops everything.""",
        flush=True,
    )
    stopping = []

    def on_signal(*_):
        stopping.append(True)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stopping and all(p.poll() is None for p in stack.procs):
        time.sleep(0.5)
    print("stopping …", flush=True)
    stack.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["demo"]:
        demo()
    else:
        print(__doc__)
        sys.exit(2)
