"""FABlib refreshing through tokenhub's FABRIC broker, as a FABRIC user meets
it: the real `fabrictestbed` from PyPI (FabricManagerV2, its CredmgrClient
with urllib3's retries) run as the user, with the spawned server's own
environment, in a JupyterHub whose servers run as local accounts. The
Credential Manager is a stand-in of the tests' own (idp/credmgr.mjs, after
the CM's documented API: a refresh at the IdP with the client it shares with
tokenhub, an RS256 FABRIC JWT with `projects`, `/certs`) in front of
oidc-provider with refresh-token rotation on. The broker is tokenhub's own
TLS listener on port 443 of a host name of the test's own (an /etc/hosts
line), with a certificate from a test CA that the kernels trust through
REQUESTS_CA_BUNDLE (the CA and certifi's roots), as FABlib needs.

How close to production: FABRIC's real CM is replaced by the stand-in, and
CILogon by oidc-provider; FABlib, requests, urllib3, the TLS check, the
kernels' processes and the hub are the real ones."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import certifi
import jwt
import pytest
from conftest import ROOT, Hub, idp_refreshes, log_in_and_spawn, remember, stack_logs, start_stack, tokenhub_call, vault_bytes
from stack import free_port
from test_local_user_file import server_python, system_user  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="port 443, /etc/hosts and servers as users need root")

BROKER = "fabric-broker.tokenhub.test"
FABRIC_RC = """export FABRIC_CREDMGR_HOST=cm.fabric-testbed.net
export FABRIC_ORCHESTRATOR_HOST=orchestrator.fabric-testbed.net
export FABRIC_PROJECT_ID=p-1
export FABRIC_TOKEN_LOCATION=${HOME}/.tokens.json
"""


def test_ca_and_broker_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA, and the broker's certificate and key signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenhub test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BROKER)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(BROKER)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "broker.pem").write_bytes(cert.public_bytes(pem))
    (folder / "broker.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    # What the kernels trust: the usual roots and the test CA.
    bundle = folder / "ca-bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + ca.public_bytes(pem))
    bundle.chmod(0o644)
    return folder / "broker.pem", folder / "broker.key", bundle


test_ca_and_broker_certificate.__test__ = False  # a helper, not a test


class Cm:
    """The stand-in Credential Manager, started after the stack (it needs the IdP's URL)."""

    def __init__(self, port: int, stack, state: Path):
        self.port, self.stack = port, stack
        self.url = f"http://127.0.0.1:{port}"
        self.log = state / "credmgr.log"
        self.start(3600)

    def start(self, ttl: int) -> None:
        """Starts the CM, its FABRIC JWTs valid `ttl` seconds (a new key each start)."""
        env = {
            **os.environ,
            "CM_PORT": str(self.port),
            "CM_IDP": self.stack.idp_url,
            "CM_CLIENT_ID": "tokenhub",
            "CM_CLIENT_SECRET": self.stack.idp_client_secret,
            "CM_TOKEN_TTL": str(ttl),
        }
        self.proc = subprocess.Popen(
            ["node", str(ROOT / "idp" / "credmgr.mjs")], env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return
            except OSError:
                assert time.monotonic() < deadline, "the stand-in CM did not start"
                time.sleep(0.2)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_test/stats", timeout=10) as r:
            return json.loads(r.read())

    def fault(self, kind: str, query: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/_test/{kind}?{query}", method="POST"), timeout=10)

    def verify(self, token: str) -> dict:
        """The FABRIC JWT's claims, checked with the CM's `/certs`."""
        keys = jwt.PyJWKClient(f"{self.url}/credmgr/certs")
        key = keys.get_signing_key_from_jwt(token).key
        return jwt.decode(token, key, algorithms=["RS256"], audience="cm.fabric-testbed.net")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def fabric_stack_running(account, **extra_env):
    """The stack with the FABRIC broker on (its TLS listener on port 443 of
    BROKER, named in /etc/hosts meanwhile) and the stand-in CM; servers run
    as `account`."""
    scratch = Path(tempfile.mkdtemp(prefix="tokenhub-python-"))
    scratch.chmod(0o755)
    python, pythonpath = server_python(account, scratch)
    state = Path(tempfile.mkdtemp(prefix="tokenhub-e2e-fabric-"))
    cert, key, bundle = test_ca_and_broker_certificate(scratch)
    hosts = Path("/etc/hosts")
    hosts_before = hosts.read_text()
    hosts.write_text(hosts_before.rstrip("\n") + f"\n127.0.0.1 {BROKER}\n")
    cm_port = free_port()
    s = None
    try:
        s = start_stack(
            state,
            extra_env={
                "HUB_SPAWNER": "local",
                "HUB_SERVER_PYTHON": python,
                "HUB_SERVER_PYTHONPATH": pythonpath,
                "TOKENHUB_FABRIC_CREDMGR_URL": f"http://127.0.0.1:{cm_port}",
                "TOKENHUB_FABRIC_BROKER_HOST": BROKER,
                "TOKENHUB_BROKER_BIND": "127.0.0.1:443",
                "TOKENHUB_BROKER_TLS_CERT": str(cert),
                "TOKENHUB_BROKER_TLS_KEY": str(key),
                "TOKENHUB_KEEPALIVE_INTERVAL": "5",
                **extra_env,
            },
        )
        cm = Cm(cm_port, s, state)
        s.cm, s.bundle, s.server_python = cm, bundle, (python, pythonpath)
        yield s
        cm.stop()
    finally:
        if s is not None:
            s.stop()
        hosts.write_text(hosts_before)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def fabric_stack(system_user):  # noqa: F811 (the imported fixture)
    with fabric_stack_running(system_user) as s:
        yield s


KERNEL = """
import json, os, sys
from fabrictestbed.fabric_manager_v2 import FabricManagerV2
manager = FabricManagerV2(
    credmgr_host=os.environ["FABRIC_CREDMGR_HOST"],
    orchestrator_host="127.0.0.1:9",
    token_location=os.environ["FABRIC_TOKEN_LOCATION"],
    project_id="p-1",
)
print(json.dumps({"id_token": manager.get_id_token(), "refresh_token": manager.get_refresh_token()}), flush=True)
# Told to go on, refresh with the refresh token this kernel holds in memory.
if sys.stdin.readline().strip() == "refresh":
    try:
        manager.refresh_tokens()
        print(json.dumps({"id_token": manager.get_id_token(), "refresh_token": manager.get_refresh_token()}), flush=True)
    except Exception as e:
        print(json.dumps({"error": str(e)}), flush=True)
"""


def read_json(path: Path) -> dict:
    """The file's JSON, or {} while it is missing or being written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def kernel(stack, account, env: dict) -> subprocess.Popen:
    """A kernel: FABlib loaded by the user with the server's environment
    (FABRIC_CREDMGR_HOST from tokenhub) and a CA bundle that trusts the broker."""
    python, pythonpath = stack.server_python
    return subprocess.Popen(
        [python, "-c", KERNEL],
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        env={**env, "PYTHONPATH": pythonpath, "HOME": account.pw_dir, "REQUESTS_CA_BUNDLE": str(stack.bundle)},
        cwd=account.pw_dir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def line_of(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()[-3000:] if proc.poll() is not None else "the kernel said nothing"
    return json.loads(line)


def finish(proc: subprocess.Popen, say: str = "") -> list[dict]:
    out, err = proc.communicate(say + "\n", timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_fablib_kernels_refresh_through_the_broker(fabric_stack, browser, system_user):  # noqa: F811
    stack, account, cm = fabric_stack, system_user, fabric_stack.cm
    hub = Hub(stack)
    user = account.pw_name
    # The user's fabric_rc, from FABRIC's template, before the server starts.
    rc = Path(account.pw_dir) / "work" / "fabric_config" / "fabric_rc"
    rc.parent.mkdir(parents=True)
    rc.write_text(FABRIC_RC)
    for path in (rc.parent.parent, rc.parent, rc):
        os.chown(path, account.pw_uid, account.pw_gid)

    context = browser.new_context()
    page = context.new_page()
    log_in_and_spawn(page, stack, user)
    env = hub.server_env(user)
    remember(env["JUPYTERHUB_API_TOKEN"], env["CILOGON_REFRESH_TOKEN"])
    assert env["FABRIC_CREDMGR_HOST"] == BROKER
    # fabric_rc names the broker; every other line is as it was.
    deadline = time.monotonic() + 30
    while BROKER not in rc.read_text():
        assert time.monotonic() < deadline, rc.read_text()
        time.sleep(0.5)
    assert rc.read_text() == FABRIC_RC.replace("cm.fabric-testbed.net", BROKER)
    page.goto(f"{stack.tokenhub_url}/")
    assert BROKER in page.inner_text("#fabric-rc")

    # The new server's token file gets a FABRIC JWT at once.
    path = Path(env["FABRIC_TOKEN_LOCATION"])
    deadline = time.monotonic() + 30
    while read_json(path).get("comment") != "Created via API":
        assert time.monotonic() < deadline, "no FABRIC JWT in the token file"
        time.sleep(0.5)
    assert cm.stats()["answered"] == 1
    # Two kernels load FABlib at the same moment: one refresh at the CM, one at the IdP.
    before_idp = idp_refreshes(stack, user)
    first, second = kernel(stack, account, env), kernel(stack, account, env)
    a, b = line_of(first), line_of(second)
    assert a == b, "both kernels hold the same tokens"
    assert cm.stats()["answered"] == 2 and idp_refreshes(stack, user) - before_idp == 1
    claims = cm.verify(a["id_token"])
    assert claims["projects"][0]["uuid"] == "p-1"
    remember(a["id_token"], a["refresh_token"])

    # tokenhub refreshes (a notebook asks it to): the kernels' refresh token
    # is rotated away under them; each still refreshes, onto the current set.
    status, forced, _ = tokenhub_call(stack, env["JUPYTERHUB_API_TOKEN"], "POST", "/api/v1/tokens/refresh")
    assert status == 200, forced
    assert cm.stats()["answered"] == 3, "tokenhub's own refresh went through the CM"
    remember(forced["refresh_token"], forced["id_token"])
    for proc in (first, second):
        (after,) = finish(proc, "refresh")
        assert after == {"id_token": forced["id_token"], "refresh_token": forced["refresh_token"]}, after
    assert cm.stats()["answered"] == 3, "answered from the vault"
    assert cm.stats()["refused"] == 0, "no refresh token was ever refused at the IdP"

    # A refresh whose answer FABlib does not read in time (the CM answers 5 s
    # late, FABlib waits 2 s), retried by urllib3, converges on one refresh.
    cm.fault("hold", "seconds=5&count=1")
    retried = subprocess.run(
        [
            stack.server_python[0],
            "-c",
            "import json, os\n"
            "from fabrictestbed.external_api.credmgr_client import CredmgrClient\n"
            "client = CredmgrClient(os.environ['FABRIC_CREDMGR_HOST'], timeout=2)\n"
            "(token,) = client.refresh(refresh_token=os.environ['RT'], project_id='p-lost')\n"
            "print(json.dumps(token))",
        ],
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        env={
            **env,
            "RT": forced["refresh_token"],
            "PYTHONPATH": stack.server_python[1],
            "HOME": account.pw_dir,
            "REQUESTS_CA_BUNDLE": str(stack.bundle),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert retried.returncode == 0, retried.stderr[-3000:]
    late = json.loads(retried.stdout)
    assert cm.verify(late["id_token"])["projects"][0]["uuid"] == "p-lost"
    stats = cm.stats()
    assert (stats["answered"], stats["held"], stats["refused"]) == (4, 1, 0), stats
    assert stats["paths"]["/credmgr/tokens/refresh"] == 4, "one CM refresh for the retried call"
    remember(late["refresh_token"], late["id_token"])

    # The CM refuses (the grant is gone at the IdP): FABlib's error names
    # /refresh; after /refresh in the browser FABlib works again, in a kernel
    # that still holds the old refresh token too, without a restart.
    urllib.request.urlopen(urllib.request.Request(f"{stack.idp_url}/_test/kill?account={user}", method="POST"), timeout=10)
    stale = kernel(stack, account, env)
    line_of(stale)  # its load's own refresh failed (FABlib logs that and goes on)
    failed = subprocess.run(
        [
            stack.server_python[0],
            "-c",
            "import os\n"
            "from fabrictestbed.fabric_manager_v2 import FabricManagerV2\n"
            "m = FabricManagerV2(credmgr_host=os.environ['FABRIC_CREDMGR_HOST'], orchestrator_host='127.0.0.1:9',"
            " token_location=os.environ['FABRIC_TOKEN_LOCATION'], project_id='p-1', auto_refresh=False)\n"
            "m.refresh_tokens()",
        ],
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        env={**env, "PYTHONPATH": stack.server_python[1], "HOME": account.pw_dir, "REQUESTS_CA_BUNDLE": str(stack.bundle)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode != 0
    assert "invalid or has expired" in failed.stderr and f"{stack.tokenhub_url}/refresh" in failed.stderr, failed.stderr[-2000:]

    page.goto(f"{stack.tokenhub_url}/refresh")
    page.wait_for_selector("#renewed-title", timeout=60_000)
    (renewed,) = finish(stale, "refresh")
    assert "error" not in renewed, renewed
    assert cm.verify(renewed["id_token"])["sub"] == claims["sub"]
    remember(renewed["refresh_token"], renewed["id_token"])
    context.close()

    # No refresh token or JWT in any log; the vault holds them sealed.
    from conftest import SEEN_TOKENS, leaked

    logs = stack_logs(stack, cm.log)
    assert not leaked(SEEN_TOKENS, logs), leaked(SEEN_TOKENS, logs)
    assert not leaked(SEEN_TOKENS, vault_bytes(stack))


def test_keepalive_and_fablib_interleave_over_several_token_lifetimes(fabric_stack, browser, system_user):  # noqa: F811
    """FABRIC JWTs of 20 s: tokenhub's keep-alive refreshes through the CM
    every round (5 s) while kernels keep loading FABlib (each load refreshes
    with the token file's refresh token), for more than three lifetimes.
    No refresh token is refused anywhere, every kernel gets a valid JWT, and
    the token file ends holding the newest tokens."""
    stack, account, cm = fabric_stack, system_user, fabric_stack.cm
    hub = Hub(stack)
    user = account.pw_name
    cm.stop()
    cm.start(20)
    before = cm.stats()
    log_from = stack.hub_log.stat().st_size
    with urllib.request.urlopen(f"{stack.idp_url}/_test/stats", timeout=10) as r:
        idp_errors = json.loads(r.read())["refresh_token_error"]
    context = browser.new_context()
    log_in_and_spawn(context.new_page(), stack, user)
    env = hub.server_env(user)
    token = env["JUPYTERHUB_API_TOKEN"]
    remember(token)
    deadline = time.monotonic() + 70
    loads = 0
    while time.monotonic() < deadline:
        proc = kernel(stack, account, env)
        got = line_of(proc)
        finish(proc)
        remember(got["id_token"], got["refresh_token"])
        claims = cm.verify(got["id_token"])  # valid now, signed by the CM
        assert claims["exp"] > time.time()
        loads += 1
        time.sleep(1)
    after = cm.stats()
    made = after["answered"] - before["answered"]
    assert loads >= 5 and made >= 10, (loads, made)
    assert after["refused"] == before["refused"], "the CM never had a refresh token refused"
    with urllib.request.urlopen(f"{stack.idp_url}/_test/stats", timeout=10) as r:
        assert json.loads(r.read())["refresh_token_error"] == idp_errors, "no refresh token refused at the IdP"
    status, current, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
    assert status == 200, current
    # The file catches up with every refresh (keep-alive goes on meanwhile).
    path = Path(env["FABRIC_TOKEN_LOCATION"])
    deadline = time.monotonic() + 20
    while True:
        status, current, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
        document = read_json(path)
        if document.get("refresh_token") == current["refresh_token"]:
            break
        assert time.monotonic() < deadline, "the token file does not hold the newest tokens"
        time.sleep(0.5)
    assert document["id_token"] == current["id_token"]
    remember(current["refresh_token"], current["id_token"])
    with open(stack.hub_log, "rb") as log:
        log.seek(log_from)
        assert b"invalid_grant" not in log.read(), "no refusal in tokenhub's log meanwhile"
    context.close()
