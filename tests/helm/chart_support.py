"""Shared helpers of the chart tests: the value sets the chart is rendered
with, and rendering (with Helm's own Go SDK, helm-python-sdk) to a list of
Kubernetes objects."""

import base64
import copy
import os
import socket
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "tokenhub"
EXAMPLES = ROOT / "helm" / "examples"
BLOCK = ROOT / "hub" / "tokenhub_config.py"
ALERTS = CHART_DIR / "files" / "alerts.yaml"
# Z2JH's values schema and defaults: shared/ lies beside the repository (CI
# clones it there too).
Z2JH_DIR = Path(os.environ.get("Z2JH_DIR", ROOT.parent / "shared" / "z2jh"))
RELEASE = "tokenhub"
NAMESPACE = "jupyterhub"

# What the chart cannot work without; everything else is its defaults.
REQUIRED = {
    "publicUrl": "https://hub.example.org/services/tokenhub",
    "oidc": {"issuer": "https://cilogon.org", "clientId": "tokenhub-client", "clientSecret": "oidc-test-secret"},
    "jupyterhub": {"redirectUri": "https://hub.example.org/hub/oauth_callback"},
}


def merged(base, override):
    """`override` deep-merged over `base` the way Helm merges values files:
    maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def example(name, **override):
    """An example values file from helm/examples, with `override` merged in."""
    return merged(yaml.safe_load((EXAMPLES / name).read_text()), override)


# The value sets every rendering test runs with.
VALUE_SETS = {
    "defaults": REQUIRED,
    "sqlite-example": example("tokenhub-sqlite.yaml", oidc={"clientSecret": "oidc-test-secret"}),
    "postgresql-3-replicas": example("tokenhub-postgresql.yaml", oidc={"clientSecret": "oidc-test-secret"}),
    "postgresql-url": merged(
        REQUIRED,
        {"replicas": 2, "database": {"url": "postgres://tokenhub:pw@db.example.org:5432/tokenhub"}},
    ),
    "postgresql-jobs": merged(
        REQUIRED,
        {
            "replicas": 2,
            "database": {"url": "postgres://tokenhub:pw@db.example.org:5432/tokenhub"},
            "jobs": {"migrate": True, "rekey": True},
        },
    ),
    "existing-secret": merged(
        REQUIRED,
        {
            "existingSecret": "my-tokenhub-secrets",
            "jupyterhub": {"apiToken": {"secretName": "my-hub-token", "secretKey": "token"}},
        },
    ),
    "servicemonitor-ingress": merged(
        REQUIRED,
        {
            "publicUrl": "https://tokenhub.example.org",
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
            "ingress": {"enabled": True, "className": "nginx", "tls": {"secretName": "tokenhub-tls"}},
            "networkPolicy": {
                "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
            },
        },
    ),
    "fabric-broker": merged(
        REQUIRED,
        {
            "fabric": {
                "credmgrUrl": "https://cm.fabric-testbed.net",
                "brokerHost": "fabric-broker.hub.example.org",
                "custody": False,
                "ingress": {"enabled": True, "className": "nginx", "tls": {"secretName": "fabric-broker-tls"}},
            },
        },
    ),
}


def render(chart, values, name=RELEASE, namespace=NAMESPACE):
    """Renders the chart as `helm install` would (offline: `lookup` finds
    nothing). Returns (objects, notes): the Kubernetes objects in order, and
    NOTES.txt as text."""
    rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    objects, notes = [], None
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, notes


def find(objects, kind, name=None):
    """The one object of `kind` (and `name`), failing if there is not exactly one."""
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in hits]}"
    return hits[0]


def kinds(objects):
    return sorted(o["kind"] for o in objects)


def secret_data(secret):
    """A Secret's data, decoded."""
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def alert_rules(rule_file: dict) -> list[dict]:
    """Every rule of a Prometheus rule file (`groups: [{rules: [...]}]`)."""
    return [rule for group in rule_file["groups"] for rule in group["rules"]]


# Figures the tests measured, printed at the end of the run (conftest.py).
FIGURES: dict[str, str] = {}


def free_port():
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
