"""The chart renders with every value set, and every object it renders is
valid, strictly (no unknown fields), against the Kubernetes API schemas of
the lowest and the highest Kubernetes version the chart claims."""

import re

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from chart_support import CHART_DIR, RELEASE, REQUIRED, VALUE_SETS, find, kinds, merged, render, secret_data

CHART = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())


def claimed_versions():
    """The lowest Kubernetes version of Chart.yaml's kubeVersion (">=X.Y.Z-0")
    and the newest that kubernetes-validate ships (the constraint has no
    upper bound)."""
    lowest = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", CHART["kubeVersion"])
    assert lowest, f"kubeVersion {CHART['kubeVersion']!r}: expected a lower bound only"
    return [lowest.group(1), kubernetes_validate.utils.latest_version()]


# Kinds whose schemas are not Kubernetes' own (CRDs): checked by hand below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("version", claimed_versions())
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_object_is_valid_kubernetes(chart, value_set, version):
    objects, _ = render(chart, VALUE_SETS[value_set])
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_kubernetes_versions_are_the_claimed_ones():
    low, high = claimed_versions()
    assert low == "1.28.0"
    assert tuple(map(int, high.split("."))) >= (1, 28, 0)
    assert low in kubernetes_validate.utils.all_versions()


def test_lint_is_clean():
    # Helm's own linter, strict (warnings fail); info messages (e.g. "icon is
    # recommended") are not findings.
    for values in (REQUIRED, VALUE_SETS["postgresql-3-replicas"], VALUE_SETS["servicemonitor-ingress"]):
        report = helm.lint(CHART_DIR, values, strict=True, namespace="jupyterhub")
        findings = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["total_charts_linted"] == 1
        assert not findings and not report["errors"], findings or report["errors"]


def pod_spec(objects):
    return find(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects):
    (only,) = pod_spec(objects)["containers"]
    return only


def env_refs(objects):
    """{variable: (secret name, key)} for the container's secretKeyRef env."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container(objects)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_defaults_sqlite_one_replica_with_a_volume(chart):
    objects, _ = render(chart, REQUIRED)
    assert kinds(objects) == [
        "ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget", "Secret", "Service",
    ]
    deployment = find(objects, "Deployment")
    assert deployment["metadata"]["name"] == RELEASE
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "two pods must never share the SQLite file"
    config = find(objects, "ConfigMap")["data"]
    assert config["TOKENHUB_DATABASE_URL"] == "sqlite:///data/tokenhub.sqlite?mode=rwc"
    pvc = find(objects, "PersistentVolumeClaim")
    (data,) = [v for v in pod_spec(objects)["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert {"name": "data", "mountPath": "/data"} in container(objects)["volumeMounts"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_the_container_is_locked_down(chart):
    objects, _ = render(chart, REQUIRED)
    pod = pod_spec(objects)
    ctx = container(objects)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False, "service links would add TOKENHUB_PORT & co. to the environment"
    # The root filesystem is read-only: /tmp is a volume.
    (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in container(objects)["volumeMounts"]
    assert container(objects)["resources"]["requests"] and container(objects)["resources"]["limits"]["memory"]


def test_probes_are_under_the_public_url_path(chart):
    objects, _ = render(chart, REQUIRED)
    c = container(objects)
    assert c["livenessProbe"]["httpGet"] == {"path": "/services/tokenhub/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/services/tokenhub/readyz", "port": "http"}
    objects, _ = render(chart, VALUE_SETS["servicemonitor-ingress"])  # publicUrl at the root of its own host
    assert container(objects)["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_z2jh_labels_names_and_secrets(chart):
    objects, _ = render(chart, REQUIRED)
    labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    # Z2JH's network policies admit pods with these labels to the hub and the proxy.
    assert labels["hub.jupyter.org/network-access-hub"] == "true"
    assert labels["hub.jupyter.org/network-access-proxy-http"] == "true"
    for obj in objects:
        lab = obj["metadata"]["labels"]
        for key in ("app", "release", "component", "chart", "heritage"):
            assert key in lab, f"{obj['kind']} lacks legacy label {key}"
        for key in ("name", "instance", "component", "managed-by"):
            assert f"app.kubernetes.io/{key}" in lab, f"{obj['kind']} lacks app.kubernetes.io/{key}"
    # Selectors pick the pods.
    selector = find(objects, "Service")["spec"]["selector"]
    assert selector.items() <= labels.items()
    assert find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert find(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    # The hub's API token: Z2JH's Secret "hub" by default.
    refs = env_refs(objects)
    assert refs["JUPYTERHUB_API_TOKEN"] == ("hub", "hub.services.tokenhub.apiToken")
    for variable, key in (
        ("TOKENHUB_CRYPT_KEY", "crypt-key"),
        ("TOKENHUB_OIDC_CLIENT_SECRET", "oidc-client-secret"),
        ("TOKENHUB_HUB_CLIENT_SECRET", "hub-client-secret"),
    ):
        assert refs[variable] == (RELEASE, key)
    data = secret_data(find(objects, "Secret"))
    assert data["oidc-client-secret"] == "oidc-test-secret"
    assert len(data["hub-client-secret"]) == 48
    # A generated key is 32 random bytes in base64, what tokenhub accepts.
    import base64

    assert len(base64.b64decode(data["crypt-key"])) == 32
    # No secret in the ConfigMap.
    config = find(objects, "ConfigMap")["data"]
    assert not any(v in config.values() for v in data.values())


def test_name_overrides(chart):
    objects, _ = render(chart, merged(REQUIRED, {"fullnameOverride": "vault"}), name="whatever")
    assert {o["metadata"]["name"] for o in objects} == {"vault", "vault-data"}
    objects, _ = render(chart, merged(REQUIRED, {"nameOverride": "th"}), name="prod")
    assert find(objects, "Deployment")["metadata"]["name"] == "prod-th"
    assert find(objects, "Deployment")["metadata"]["labels"]["app"] == "th"
    objects, _ = render(chart, REQUIRED, name="tokenhub-prod")
    assert find(objects, "Deployment")["metadata"]["name"] == "tokenhub-prod", "release name containing the chart's"


def test_postgresql_three_replicas_and_no_volume(chart):
    objects, _ = render(chart, VALUE_SETS["postgresql-3-replicas"])
    assert "PersistentVolumeClaim" not in kinds(objects)
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert [v["name"] for v in pod_spec(objects)["volumes"]] == ["tmp"]
    assert env_refs(objects)["TOKENHUB_DATABASE_URL"] == ("tokenhub-database", "database-url")
    assert "TOKENHUB_DATABASE_URL" not in find(objects, "ConfigMap")["data"]
    egress = find(objects, "NetworkPolicy")["spec"]["egress"]
    assert {"ports": [{"port": 5432, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]} in egress


def test_postgresql_url_is_kept_in_the_secret(chart):
    url = VALUE_SETS["postgresql-url"]["database"]["url"]
    objects, _ = render(chart, VALUE_SETS["postgresql-url"])
    assert env_refs(objects)["TOKENHUB_DATABASE_URL"] == (RELEASE, "database-url")
    assert secret_data(find(objects, "Secret"))["database-url"] == url
    assert url not in yaml.safe_dump(find(objects, "ConfigMap")), "a password belongs in the Secret"


def test_existing_secret_replaces_the_charts(chart):
    objects, _ = render(chart, VALUE_SETS["existing-secret"])
    assert "Secret" not in kinds(objects)
    refs = env_refs(objects)
    assert refs["JUPYTERHUB_API_TOKEN"] == ("my-hub-token", "token")
    for variable in ("TOKENHUB_CRYPT_KEY", "TOKENHUB_OIDC_CLIENT_SECRET", "TOKENHUB_HUB_CLIENT_SECRET"):
        assert refs[variable][0] == "my-tokenhub-secrets"


def test_api_token_as_a_value(chart):
    objects, _ = render(chart, merged(REQUIRED, {"jupyterhub": {"apiToken": {"value": "hub-token-value"}}}))
    assert env_refs(objects)["JUPYTERHUB_API_TOKEN"] == (RELEASE, "hub-api-token")
    assert secret_data(find(objects, "Secret"))["hub-api-token"] == "hub-token-value"


def test_servicemonitor_and_ingress(chart):
    objects, _ = render(chart, VALUE_SETS["servicemonitor-ingress"])
    monitor = find(objects, "ServiceMonitor")
    # A CRD: no Kubernetes schema to validate against, so its shape is checked here.
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    service = find(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"

    ingress = find(objects, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "tokenhub.example.org"
    assert rule["http"]["paths"] == [
        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": RELEASE, "port": {"name": "http"}}}}
    ]
    assert ingress["spec"]["tls"] == [{"hosts": ["tokenhub.example.org"], "secretName": "tokenhub-tls"}]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    # The ingress controller's namespace may reach tokenhub.
    rules = find(objects, "NetworkPolicy")["spec"]["ingress"]
    assert {
        "ports": [{"port": "http"}],
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
    } in rules

    # Behind the proxy, the Ingress serves the public URL's path.
    objects, _ = render(chart, merged(REQUIRED, {"ingress": {"enabled": True}}))
    (path,) = find(objects, "Ingress")["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == "/services/tokenhub"
    assert "tls" not in find(objects, "Ingress")["spec"]


def test_network_policy_admits_z2jh_and_reaches_hub_proxy_idp(chart):
    objects, _ = render(chart, REQUIRED)
    policy = find(objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (z2jh,) = policy["ingress"]
    assert z2jh["ports"] == [{"port": "http"}]
    assert [peer["podSelector"]["matchLabels"] for peer in z2jh["from"]] == [
        {"app": "jupyterhub", "component": c} for c in ("proxy", "hub")
    ], "users' servers reach tokenhub through the proxy only"
    objects, _ = render(chart, merged(REQUIRED, {"networkPolicy": {"allowUserServers": True}}))
    peers = find(objects, "NetworkPolicy")["spec"]["ingress"][0]["from"]
    assert [p["podSelector"]["matchLabels"]["component"] for p in peers] == ["proxy", "hub", "singleuser-server"]
    egress = policy["egress"]
    assert {"to": [{"podSelector": {"matchLabels": {"app": "jupyterhub", "component": "hub"}}}], "ports": [{"port": 8081}]} in egress
    assert {"to": [{"podSelector": {"matchLabels": {"app": "jupyterhub", "component": "proxy"}}}], "ports": [{"port": 8000}]} in egress
    assert {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]} in egress
    assert {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]} in egress
    assert not any(p.get("port") == 5432 for rule in egress for p in rule.get("ports", [])), "no database port with SQLite"
    # Narrowed to one hub release, and switched off.
    objects, _ = render(chart, merged(REQUIRED, {"networkPolicy": {"jupyterhubPodLabels": {"app": "jupyterhub", "release": "hub1"}}}))
    peers = find(objects, "NetworkPolicy")["spec"]["ingress"][0]["from"]
    assert all(p["podSelector"]["matchLabels"]["release"] == "hub1" for p in peers)
    objects, _ = render(chart, merged(REQUIRED, {"networkPolicy": {"enabled": False}, "pdb": {"enabled": False}}))
    assert "NetworkPolicy" not in kinds(objects) and "PodDisruptionBudget" not in kinds(objects)


def test_the_settings_are_the_environment_tokenhub_reads(chart):
    objects, _ = render(chart, REQUIRED)
    config = find(objects, "ConfigMap")["data"]
    assert config == {
        "TOKENHUB_BIND": "0.0.0.0:8000",
        "TOKENHUB_PUBLIC_URL": "https://hub.example.org/services/tokenhub",
        "TOKENHUB_OIDC_ISSUER": "https://cilogon.org",
        "TOKENHUB_OIDC_CLIENT_ID": "tokenhub-client",
        "TOKENHUB_HUB_CLIENT_ID": "jupyterhub",
        "TOKENHUB_HUB_REDIRECT_URI": "https://hub.example.org/hub/oauth_callback",
        "JUPYTERHUB_API_URL": "http://hub:8081/hub/api",
        "TOKENHUB_HUB_URL": "http://proxy-public",
        "TOKENHUB_DATABASE_URL": "sqlite:///data/tokenhub.sqlite?mode=rwc",
        "TOKENHUB_LOG": "info",
        "TOKENHUB_LOG_FORMAT": "json",
    }
    c = container(objects)
    assert c["envFrom"] == [{"configMapRef": {"name": RELEASE}}]
    assert c["args"] == ["serve"] and "command" not in c, "the image's ENTRYPOINT is tokenhub"
    # IPv6 listen address, and a ttl that must not become "1e+06".
    objects, _ = render(chart, merged(REQUIRED, {"bindHost": "::", "jupyterhub": {"tokenTtl": 1000000}}))
    config = find(objects, "ConfigMap")["data"]
    assert config["TOKENHUB_BIND"] == "[::]:8000"
    assert config["TOKENHUB_HUB_TOKEN_TTL"] == "1000000"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "tokenhub needs these values:\n  - publicUrl (tokenhub as browsers reach it, e.g. https://hub.example.org/services/tokenhub)\n  - oidc.issuer"),
        ({k: v for k, v in REQUIRED.items() if k != "oidc"}, "needs these values:\n  - oidc.issuer (the IdP's issuer URL, e.g. https://cilogon.org)\n  - oidc.clientId"),
        (merged(REQUIRED, {"oidc": {"clientSecret": ""}}), "needs these values:\n  - oidc.clientSecret (tokenhub's client secret at the IdP; or name your Secret in existingSecret)"),
        (merged(REQUIRED, {"jupyterhub": {"redirectUri": ""}}), "needs these values:\n  - jupyterhub.redirectUri (the hub's OAuth callback"),
        (merged(REQUIRED, {"publicUrl": "https://hub.example.org/x?a=b"}), "publicUrl must not have a query"),
    ],
)
def test_missing_settings_are_named(chart, values, message):
    with pytest.raises(helm.HelmError) as failure:
        render(chart, values)
    assert message in str(failure.value)


def test_database_jobs_run_the_commands_with_the_vaults_settings(chart):
    """jobs.migrate and jobs.rekey: Helm hook Jobs running `tokenhub migrate`
    before an upgrade and `tokenhub rekey` after one, with the Deployment's
    image, security context and vault settings; PostgreSQL only."""
    objects, _ = render(chart, VALUE_SETS["postgresql-jobs"])
    deployment = pod_spec(objects)["containers"][0]
    hooks = {"migrate": "pre-upgrade", "rekey": "post-upgrade"}
    for command, hook in hooks.items():
        job = find(objects, "Job", f"{RELEASE}-{command}")
        assert job["metadata"]["annotations"]["helm.sh/hook"] == hook
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["args"] == [command]
        assert container["image"] == deployment["image"]
        assert container["securityContext"] == deployment["securityContext"]
        assert spec["securityContext"] == pod_spec(objects)["securityContext"]
        assert spec["automountServiceAccountToken"] is False
        refs = {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]) for e in container["env"]}
        assert refs == {"TOKENHUB_CRYPT_KEY": (RELEASE, "crypt-key"), "TOKENHUB_DATABASE_URL": (RELEASE, "database-url")}
    # Off by default, and never for SQLite (the file belongs to the one pod).
    assert "Job" not in kinds(render(chart, VALUE_SETS["postgresql-url"])[0])
    assert "Job" not in kinds(render(chart, merged(REQUIRED, {"jobs": {"migrate": True, "rekey": True}}))[0])


def test_the_fabric_brokers_host_gets_an_ingress_of_its_own(chart):
    objects, _ = render(chart, VALUE_SETS["fabric-broker"])
    ingress = find(objects, "Ingress", f"{RELEASE}-broker")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "fabric-broker.hub.example.org"
    # Only the Credential Manager's paths reach tokenhub on that host.
    assert rule["http"]["paths"] == [
        {"path": "/credmgr", "pathType": "Prefix", "backend": {"service": {"name": RELEASE, "port": {"name": "http"}}}}
    ]
    assert ingress["spec"]["tls"] == [{"hosts": ["fabric-broker.hub.example.org"], "secretName": "fabric-broker-tls"}]
    settings = find(objects, "ConfigMap")["data"]
    assert settings["TOKENHUB_FABRIC_CREDMGR_URL"] == "https://cm.fabric-testbed.net"
    assert settings["TOKENHUB_FABRIC_BROKER_HOST"] == "fabric-broker.hub.example.org"
    assert settings["TOKENHUB_FABRIC_CUSTODY"] == "false", "false is said, not dropped"
    # Without the broker's host, no Ingress for it.
    objects, _ = render(chart, merged(VALUE_SETS["fabric-broker"], {"fabric": {"brokerHost": ""}}))
    assert not [o for o in objects if o["kind"] == "Ingress"]
