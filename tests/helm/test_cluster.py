"""What the chart does against a cluster, through Helm's own install action
(`helm install --dry-run=server`) talking to a stand-in Kubernetes API on
127.0.0.1: the Secret's values are looked up and kept (so an upgrade, or a
reinstall after `helm uninstall` left the Secret behind, keeps the crypt key
and the generated client secret), and a Kubernetes older than Chart.yaml's
kubeVersion is refused.

The stand-in answers what Helm asks for in a server-side dry run: /version,
API discovery, and GETs of the objects it holds. It serves no OpenAPI
document, so OpenAPI validation is off here; the objects are validated
against the Kubernetes schemas in test_render.py instead.
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import helm_python as helm
import pytest
import yaml
from helm_python import _native

from chart_support import CHART_DIR, NAMESPACE, RELEASE, REQUIRED, merged, secret_data

RESOURCES = {
    "v1": [("secrets", "Secret"), ("configmaps", "ConfigMap"), ("services", "Service"), ("persistentvolumeclaims", "PersistentVolumeClaim")],
    "apps/v1": [("deployments", "Deployment")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy"), ("ingresses", "Ingress")],
}


class FakeKubernetes(ThreadingHTTPServer):
    """A Kubernetes API of one version holding `objects` ({(plural, name): object})."""

    def __init__(self, minor, objects):
        super().__init__(("127.0.0.1", 0), Handler)
        self.minor, self.objects = minor, objects
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def kubeconfig(self):
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.server_address[1]}"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
                "current-context": "fake",
            }
        )


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def not_found(self):
        self.answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

    def do_GET(self):
        path = self.path.split("?")[0].strip("/").split("/")
        minor = self.server.minor
        if path == ["version"]:
            return self.answer(200, {"major": "1", "minor": minor, "gitVersion": f"v1.{minor}.0", "platform": "linux/amd64"})
        if path == ["api"]:
            return self.answer(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if path == ["apis"]:
            groups = [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                 "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                for gv in RESOURCES if "/" in gv
            ]
            return self.answer(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        group_version = "/".join(path[1:]) if path[0] == "api" else "/".join(path[1:3])
        if group_version in RESOURCES and len(path) == (2 if path[0] == "api" else 3):
            resources = [{"name": plural, "singularName": "", "namespaced": True, "kind": kind, "verbs": ["get", "list"]}
                         for plural, kind in RESOURCES[group_version]]
            return self.answer(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
        # .../namespaces/<namespace>/<plural>/<name>
        if len(path) >= 4 and path[-4] == "namespaces" and path[-3] == NAMESPACE and (path[-2], path[-1]) in self.server.objects:
            return self.answer(200, self.server.objects[(path[-2], path[-1])])
        return self.not_found()

    def do_POST(self):
        self.answer(405, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 405, "message": "read-only"})

    do_PUT = do_PATCH = do_DELETE = do_POST


def stored_secret(**data):
    """The chart's Secret as an earlier install left it (with Helm's ownership marks)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": RELEASE,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE},
        },
        "type": "Opaque",
        "data": {k.replace("_", "-"): base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def dry_run_install(cluster, values):
    """`helm install --dry-run=server` against `cluster`: the rendered objects.
    helm-python-sdk's install() has no switch for OpenAPI validation, so the
    call goes to its native layer with Helm's option of that name."""
    with helm.Config(kubeconfig_content=cluster.kubeconfig(), namespace=NAMESPACE, storage_driver="memory") as config:
        payload = _native.call_string(
            "helm_install",
            config._raw(),
            config._context_arg(None),
            *config._chart_args(str(CHART_DIR)),
            RELEASE,
            json.dumps(values),
            json.dumps({"namespace": NAMESPACE, "dry_run": "server", "disable_openapi_validation": True}),
        )
    return [doc for doc in yaml.safe_load_all(json.loads(payload)["manifest"]) if doc]


@pytest.fixture
def cluster(request):
    minor, objects = getattr(request, "param", ("30", {}))
    server = FakeKubernetes(minor, objects)
    yield server
    server.shutdown()
    server.server_close()


def the_secret(objects):
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    return secret_data(secret)


KEPT = {"crypt_key": "k" * 64, "oidc_client_secret": "stored-oidc-secret", "hub_client_secret": "stored-hub-secret"}


@pytest.mark.parametrize("cluster", [("30", {("secrets", RELEASE): stored_secret(**KEPT)})], indirect=True)
def test_stored_secret_values_are_kept(cluster):
    # No secret in the values at all (as on `helm upgrade` without them): the stored ones stay.
    values = merged(REQUIRED, {"oidc": {"clientSecret": ""}})
    data = the_secret(dry_run_install(cluster, values))
    assert data == {"crypt-key": KEPT["crypt_key"], "oidc-client-secret": KEPT["oidc_client_secret"], "hub-client-secret": KEPT["hub_client_secret"]}
    # Values given win over the stored ones (key rotation, a new IdP secret).
    values = merged(REQUIRED, {"cryptKey": "new;" + "k" * 64, "oidc": {"clientSecret": "new-oidc-secret"}})
    data = the_secret(dry_run_install(cluster, values))
    assert data["crypt-key"] == "new;" + "k" * 64
    assert data["oidc-client-secret"] == "new-oidc-secret"
    assert data["hub-client-secret"] == KEPT["hub_client_secret"]


def test_a_first_install_generates_and_needs_the_idp_secret(cluster):
    data = the_secret(dry_run_install(cluster, REQUIRED))
    assert len(base64.b64decode(data["crypt-key"])) == 32 and len(data["hub-client-secret"]) == 48
    assert data != the_secret(dry_run_install(cluster, REQUIRED)), "fresh random values on each first install"
    with pytest.raises(helm.HelmError, match="needs these values:\n  - oidc.clientSecret"):
        dry_run_install(cluster, merged(REQUIRED, {"oidc": {"clientSecret": ""}}))


@pytest.mark.parametrize("cluster", [("27", {})], indirect=True)
def test_an_older_kubernetes_is_refused(cluster):
    with pytest.raises(helm.HelmError, match=r"chart requires kubeVersion: >=1.28.0-0 which is incompatible with Kubernetes v1.27.0"):
        dry_run_install(cluster, REQUIRED)


@pytest.mark.parametrize("cluster", [("28", {})], indirect=True)
def test_the_oldest_claimed_kubernetes_is_accepted(cluster):
    objects = dry_run_install(cluster, REQUIRED)
    assert {o["kind"] for o in objects} >= {"Deployment", "Secret", "ConfigMap", "Service", "PersistentVolumeClaim"}
