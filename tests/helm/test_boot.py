"""The rendered chart boots: the real tokenhub binary, started with exactly
the environment the rendered Deployment gives its container (ConfigMap and
Secret references resolved from the rendered objects), answers its probes.

What differs from the pod, and why:
  - TOKENHUB_BIND is 127.0.0.1:<free port> instead of 0.0.0.0:8000: servers
    started by tests listen on loopback only, and tests run side by side;
  - each volume the pod mounts is a directory under the test's tmp_path, and
    its mount path in any setting (the SQLite URL) is rewritten to it; the
    working directory is the data volume, as the image's WORKDIR is /data;
  - Z2JH's Secret "hub" does not exist here: its token is a test value;
  - the IdP, the hub's API and the proxy are 127.0.0.1 ports where nothing
    listens (tokenhub reaches the IdP only for discovery at start, and that
    failing is not fatal): no traffic leaves the machine.
"""

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chart_support import REQUIRED, ROOT, VALUE_SETS, alert_rules, find, free_port, merged, render, secret_data

BINARY = Path(os.environ.get("TOKENHUB_BIN", ROOT / "target" / "debug" / "tokenhub"))
HUB_SECRET = {"hub": {"hub.services.tokenhub.apiToken": "z2jh-generated-test-token"}}
# Settings of `tokenhub serve --help` the chart leaves unset on purpose.
NOT_FOR_THE_CHART = {
    "TOKENHUB_CONFIG": "every setting is in the environment from the ConfigMap and Secret",
    "JUPYTERHUB_SERVICE_PREFIX": "set by the hub for a service it starts; publicUrl's path says it here",
    "JUPYTERHUB_SERVICE_URL": "set by the hub for a service it starts; TOKENHUB_BIND says it here",
    "TOKENHUB_HEADER_READ_TIMEOUT": "tokenhub's connection limits have safe defaults; extraEnv can set them",
    "TOKENHUB_BODY_READ_TIMEOUT": "tokenhub's connection limits have safe defaults; extraEnv can set them",
    "TOKENHUB_MAX_CONNECTIONS": "tokenhub's connection limits have safe defaults; extraEnv can set them",
    "TOKENHUB_MAX_HEADER_BYTES": "tokenhub's connection limits have safe defaults; extraEnv can set them",
    "TOKENHUB_DATABASE_POOL_SIZE": "the database pool has safe defaults; extraEnv can set it",
    "TOKENHUB_DATABASE_CONNECT_TIMEOUT": "the database pool has safe defaults; extraEnv can set it",
    "TOKENHUB_DATABASE_STATEMENT_TIMEOUT": "the database pool has safe defaults; extraEnv can set it",
    "TOKENHUB_BROKER_BIND": "the chart serves the FABRIC broker through its Ingress (fabric.ingress)",
    "TOKENHUB_BROKER_TLS_CERT": "the chart serves the FABRIC broker through its Ingress (fabric.ingress)",
    "TOKENHUB_BROKER_TLS_KEY": "the chart serves the FABRIC broker through its Ingress (fabric.ingress)",
}


@pytest.fixture(scope="module")
def binary():
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} is missing: build it first (cargo build --bin tokenhub) or set TOKENHUB_BIN")
    return BINARY


def die_with_parent():
    """In the child before exec: SIGTERM when the test process is gone, even
    if it is killed (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def local_values(**override):
    """Example values with every outside address on this machine, where
    nothing listens."""
    nothing = f"http://127.0.0.1:{free_port()}"
    return merged(
        VALUE_SETS["sqlite-example"],
        merged(
            {
                "oidc": {"issuer": f"{nothing}/idp"},
                "jupyterhub": {"apiUrl": f"{nothing}/hub/api", "proxyUrl": nothing},
                "serviceMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True},
            },
            override,
        ),
    )


def container_env(objects, external_secrets):
    """The container's environment as the kubelet would build it from the
    rendered objects: envFrom first, then env (which wins)."""
    container = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: secret_data(o) for o in objects if o["kind"] == "Secret"}
    for name, data in external_secrets.items():
        assert name not in secrets, f"Secret {name} is rendered by the chart, not external"
        secrets[name] = data
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            ref = entry["valueFrom"]["configMapKeyRef"]
            env[entry["name"]] = configmaps[ref["name"]][ref["key"]]
    return container, env


class Tokenhub:
    """tokenhub started from a rendered Deployment."""

    def __init__(self, binary, objects, workdir, external_secrets=HUB_SECRET):
        container, env = container_env(objects, external_secrets)
        self.env = env
        mounts = {}
        for mount in container["volumeMounts"]:
            mounts[mount["mountPath"]] = workdir / mount["name"]
            mounts[mount["mountPath"]].mkdir(parents=True, exist_ok=True)
        for path, local in mounts.items():
            env = {k: v.replace(f"{path}/", f"{local}/") for k, v in env.items()}
        self.port = free_port()
        env["TOKENHUB_BIND"] = f"127.0.0.1:{self.port}"
        self.mounts = mounts
        self.probe = container["livenessProbe"]["httpGet"]["path"]
        self.readiness = container["readinessProbe"]["httpGet"]["path"]
        self.log = open(workdir / "tokenhub.log", "w+")
        # The image's ENTRYPOINT is tokenhub; the container's args follow it.
        self.process = subprocess.Popen(
            [str(binary), *container["args"]],
            env=env,
            cwd=mounts.get("/data", workdir),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read().decode()

    def wait_until_listening(self, seconds=30):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tokenhub exited with {self.process.returncode}:\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"tokenhub did not listen within {seconds}s:\n{self.logs()}")

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def test_the_rendered_chart_boots_with_sqlite(binary, chart, tmp_path):
    objects, _ = render(chart, local_values())
    tokenhub = Tokenhub(binary, objects, tmp_path)
    try:
        tokenhub.wait_until_listening()
        expected = {
            "/services/tokenhub/healthz": {"status": "ok", "database": "ok"},
            "/services/tokenhub/readyz": {"status": "ok"},
        }
        assert [tokenhub.probe, tokenhub.readiness] == list(expected)
        for path, answer in expected.items():
            status, kind, body = tokenhub.get(path)
            assert (status, json.loads(body)) == (200, answer)
            assert kind.startswith("application/json")
        # The ServiceMonitor's path is served too.
        monitor = find(objects, "ServiceMonitor")["spec"]["endpoints"][0]
        status, kind, body = tokenhub.get(monitor["path"])
        assert status == 200 and kind.startswith("application/openmetrics-text")
        # Every metric the alert rules name is one tokenhub serves.
        served = set(re.findall(r"^(tokenhub_\w+?)(?:\{| )", body, re.M))
        for rule in alert_rules(find(objects, "PrometheusRule")["spec"]):
            assert set(re.findall(r"tokenhub_\w+", rule["expr"])) <= served, rule["alert"]
        # Routes live under publicUrl's path only.
        assert tokenhub.get("/healthz")[0] == 404
        # The vault is the SQLite file on the chart's volume.
        assert (tokenhub.mounts["/data"] / "tokenhub.sqlite").is_file()
        logs = tokenhub.logs()
    finally:
        tokenhub.stop()
    # TOKENHUB_LOG_FORMAT=json from the ConfigMap: every line is an object.
    lines = [line for line in logs.splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), logs
    assert any(json.loads(line).get("fields", {}).get("message") == "tokenhub listening" for line in lines), logs
    # No secret the chart handed over is in the log.
    secrets = secret_data(find(objects, "Secret"))
    for value in [*secrets.values(), *HUB_SECRET["hub"].values()]:
        assert value not in logs


def test_without_the_secret_tokenhub_does_not_start(binary, chart, tmp_path):
    # The same environment less the crypt key from the chart's Secret:
    # tokenhub refuses to start and names it. So the boot above depends on
    # the Secret reaching the container.
    objects, _ = render(chart, local_values())
    _, env = container_env(objects, HUB_SECRET)
    del env["TOKENHUB_CRYPT_KEY"]
    result = subprocess.run([str(binary), "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "TOKENHUB_CRYPT_KEY" in result.stderr


# The chart's optional settings: the values that set each one.
OPTIONAL = {
    "TOKENHUB_OIDC_SCOPES": {"oidc": {"scopes": "openid email offline_access"}},
    "TOKENHUB_OIDC_REDIRECT_URI": {"oidc": {"redirectUri": "https://hub.example.org/services/tokenhub/callback"}},
    "TOKENHUB_OIDC_CLIENT_AUTH_METHOD": {"oidc": {"clientAuthMethod": "client_secret_post"}},
    "TOKENHUB_OIDC_AUTH_PARAMS": {"oidc": {"authParams": "prompt=consent"}},
    "TOKENHUB_OIDC_MAX_RETRY_AFTER": {"oidc": {"maxRetryAfter": 120}},
    "TOKENHUB_USERNAME_CLAIM": {"oidc": {"usernameClaim": "email"}},
    "TOKENHUB_GROUPS_CLAIM": {"oidc": {"groupsClaim": "isMemberOf"}},
    "TOKENHUB_HUB_TOKEN_TTL": {"jupyterhub": {"tokenTtl": 600}},
    "TOKENHUB_TOKEN_FILE": {"jupyterhub": {"tokenFile": "tokens.json"}},
    "TOKENHUB_SERVICE_NAME": {"jupyterhub": {"serviceName": "tokenhub"}},
    "TOKENHUB_SHARED_SERVER_GROUPS": {"jupyterhub": {"sharedServerGroups": ["staff", "share-ok"]}},
    "TOKENHUB_SHARE_CHECK_INTERVAL": {"jupyterhub": {"shareCheckInterval": 0}},
    "TOKENHUB_AUDIT_LOG": {"log": {"audit": "stdout"}},
    "TOKENHUB_TRUSTED_PROXIES": {"trustedProxies": ["10.244.0.0/16", "192.168.1.5"]},
    "TOKENHUB_KEEPALIVE_INTERVAL": {"keepAlive": {"interval": 30}},
    "TOKENHUB_KEEPALIVE_IDLE_TIMEOUT": {"keepAlive": {"idleTimeout": 1800}},
    "TOKENHUB_KEEPALIVE_MARGIN": {"keepAlive": {"margin": 600}},
    "TOKENHUB_KEEPALIVE_GRACE": {"keepAlive": {"grace": 3600}},
    "TOKENHUB_KEEPALIVE_FRESH_ACCESS": {"keepAlive": {"freshAccess": True}},
    "TOKENHUB_NARROW_MECHANISM": {"narrowTokens": {"mechanism": "exchange"}},
    "TOKENHUB_NARROW_AUDIENCE_PARAM": {"narrowTokens": {"audienceParam": "audience"}},
    "TOKENHUB_TOKEN_RULES": {
        "narrowTokens": {"rules": [{"name": "storage", "groups": ["*"], "scopes": ["storage.read"]}]}
    },
    "TOKENHUB_DELEGATION": {"narrowTokens": {"delegation": [{"service": "dask-gateway", "scopes": ["storage.read"]}]}},
    "TOKENHUB_TOKEN_FILES": {"narrowTokens": {"files": [{"path": ".tokenhub/s", "audience": "https://s.example"}]}},
    "TOKENHUB_BEARER_TOKEN_AUDIENCE": {"narrowTokens": {"bearerToken": {"audience": "https://storage.example"}}},
    "TOKENHUB_BEARER_TOKEN_SCOPE": {"narrowTokens": {"bearerToken": {"scope": "storage.read"}}},
    "TOKENHUB_FABRIC_CREDMGR_URL": {"fabric": {"credmgrUrl": "https://cm.fabric-testbed.net"}},
    "TOKENHUB_FABRIC_BROKER_HOST": {"fabric": {"brokerHost": "fabric-broker.hub.example.org"}},
    "TOKENHUB_FABRIC_UNKNOWN_TOKENS": {"fabric": {"unknownTokens": "refuse"}},
    "TOKENHUB_FABRIC_CUSTODY": {"fabric": {"custody": True}},
    "TOKENHUB_FABRIC_EDIT_RC": {"fabric": {"editRc": False}},
    "TOKENHUB_FABRIC_MIN_VALID": {"fabric": {"minValid": 1800}},
    "TOKENHUB_FABRIC_GRACE": {"fabric": {"grace": 3600}},
}


def test_every_setting_of_tokenhub_serve_is_in_the_chart(binary, chart):
    """Everything `tokenhub serve --help` lists is an environment variable the
    chart sets (by default, or from the values in OPTIONAL) or is named in
    NOT_FOR_THE_CHART; and what the chart sets by default tokenhub reads."""
    help_text = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    known = set(re.findall(r"\[env: ([A-Z0-9_]+)", help_text))
    assert {"TOKENHUB_PUBLIC_URL", "TOKENHUB_CRYPT_KEY", "JUPYTERHUB_API_TOKEN"} <= known
    objects, _ = render(chart, REQUIRED)
    _, default_env = container_env(objects, HUB_SECRET)
    assert set(default_env) - known == set(), "variables the chart sets that tokenhub does not read"
    # Each optional value sets exactly its variable.
    rendered = set(default_env)
    for variable, values in OPTIONAL.items():
        objects, _ = render(chart, merged(REQUIRED, values))
        _, env = container_env(objects, HUB_SECRET)
        assert set(env) - set(default_env) == {variable}
        rendered.add(variable)
    missing = known - rendered - set(NOT_FOR_THE_CHART)
    assert not missing, f"settings of tokenhub serve the chart cannot set: {sorted(missing)}"


def test_replicas_share_postgresql(binary, chart, tmp_path, postgres):
    # Two replicas of the PostgreSQL rendering (no volume but /tmp), each
    # answering its probe from the same database.
    values = local_values(replicas=2, database={"url": postgres})
    objects, _ = render(chart, values)
    assert find(objects, "Deployment")["spec"]["replicas"] == 2
    replicas = []
    try:
        for n in range(2):
            (tmp_path / str(n)).mkdir()
            replica = Tokenhub(binary, objects, tmp_path / str(n))
            replicas.append(replica)
            assert set(replica.mounts) == {"/tmp"}
            assert replica.env["TOKENHUB_DATABASE_URL"] == postgres
        for replica in replicas:
            replica.wait_until_listening()
            status, _, body = replica.get(replica.readiness)
            assert (status, json.loads(body)) == (200, {"status": "ok"}), "ready: PostgreSQL answers"
    finally:
        for replica in replicas:
            replica.stop()
