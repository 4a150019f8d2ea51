"""helm/examples: the Zero to JupyterHub values pass Z2JH's own values schema
over Z2JH's defaults and carry hub/tokenhub_config.py byte for byte; the
hub values the chart's NOTES.txt prints agree with them; the tokenhub values
render as promised."""

import jsonschema
import pytest
import yaml

from chart_support import BLOCK, EXAMPLES, RELEASE, VALUE_SETS, Z2JH_DIR, find, kinds, merged, render

HUB_EXAMPLE = EXAMPLES / "jupyterhub-values.yaml"


@pytest.fixture(scope="module")
def z2jh():
    """Z2JH's default values and its values schema (JSON Schema, draft 7)."""
    if not Z2JH_DIR.is_dir():
        pytest.fail(f"Z2JH's schema and defaults are expected in {Z2JH_DIR} (set Z2JH_DIR)")
    defaults = yaml.safe_load((Z2JH_DIR / "values.yaml").read_text())
    schema = yaml.safe_load((Z2JH_DIR / "values.schema.yaml").read_text())
    return defaults, jsonschema.Draft7Validator(schema)


def z2jh_errors(z2jh, values):
    defaults, validator = z2jh
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(merged(defaults, values))]


def test_the_block_is_hub_tokenhub_config_py_byte_for_byte():
    values = yaml.safe_load(HUB_EXAMPLE.read_bytes())
    assert values["hub"]["extraConfig"]["tokenhub"].encode() == BLOCK.read_bytes()


def test_hub_example_passes_z2jh_schema(z2jh):
    values = yaml.safe_load(HUB_EXAMPLE.read_text())
    assert z2jh_errors(z2jh, values) == []
    # The schema does catch mistakes in such values (so the pass above means something).
    broken = merged(values, {"hub": {"extraEnv": "TOKENHUB_PUBLIC_URL=x", "extraConfigs": {}}})
    errors = z2jh_errors(z2jh, broken)
    assert any("'extraConfigs' was unexpected" in e for e in errors), errors
    assert any(e.startswith("hub.extraEnv:") for e in errors), errors


def test_hub_example_fits_the_tokenhub_release(chart):
    """The names in the hub values are those the chart renders for the
    release "tokenhub": its Service, its Secret, Z2JH's token key."""
    hub = yaml.safe_load(HUB_EXAMPLE.read_text())["hub"]
    objects, _ = render(chart, VALUE_SETS["sqlite-example"])
    service = find(objects, "Service")
    port = service["spec"]["ports"][0]["port"]
    assert hub["services"]["tokenhub"]["url"] == f"http://{service['metadata']['name']}:{port}"
    env = hub["extraEnv"]
    config = find(objects, "ConfigMap")["data"]
    assert env["TOKENHUB_PUBLIC_URL"] == config["TOKENHUB_PUBLIC_URL"]
    assert env["TOKENHUB_INTERNAL_URL"] == f"http://{RELEASE}:{port}/services/tokenhub"
    assert env["TOKENHUB_HUB_CLIENT_ID"] == config["TOKENHUB_HUB_CLIENT_ID"]
    assert env["TOKENHUB_HUB_REDIRECT_URI"] == config["TOKENHUB_HUB_REDIRECT_URI"]
    ref = env["TOKENHUB_HUB_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = find(objects, "Secret")
    assert ref == {"name": secret["metadata"]["name"], "key": "hub-client-secret"} and "hub-client-secret" in secret["data"]
    # tokenhub's pod reads the API token Z2JH generates for hub.services.tokenhub.
    (token,) = [e for e in find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "JUPYTERHUB_API_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hub", "key": "hub.services.tokenhub.apiToken"}
    assert "tokenhub" in hub["services"]


def notes_values(notes):
    """The hub values NOTES.txt prints between its two marker lines."""
    start = notes.index("# --- values for the Zero to JupyterHub release ---\n")
    end = notes.index("# --- end of the values for the Zero to JupyterHub release ---")
    return yaml.safe_load(notes[start:end])


def test_notes_print_the_hub_values(chart, z2jh):
    _, notes = render(chart, VALUE_SETS["sqlite-example"])
    printed = notes_values(notes)
    assert printed["hub"]["extraConfig"]["tokenhub"].encode() == BLOCK.read_bytes()
    assert z2jh_errors(z2jh, printed) == []
    # The example is what NOTES prints, plus the choices NOTES cannot know
    # (who may log in, the login button, the servers' root, the operators' role).
    example = yaml.safe_load(HUB_EXAMPLE.read_text())
    assert merged(example, printed) == example


def test_notes_follow_the_release_names(chart):
    values = merged(VALUE_SETS["existing-secret"], {"publicUrl": "https://th.example.org"})
    _, notes = render(chart, values, name="vault")
    hub = notes_values(notes)["hub"]
    assert hub["services"]["tokenhub"]["url"] == "http://vault-tokenhub:8000"
    assert hub["extraEnv"]["TOKENHUB_INTERNAL_URL"] == "http://vault-tokenhub:8000"
    assert hub["extraEnv"]["TOKENHUB_HUB_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "my-tokenhub-secrets"


def test_tokenhub_examples_render_as_described(chart):
    sqlite, _ = render(chart, VALUE_SETS["sqlite-example"])
    assert "PersistentVolumeClaim" in kinds(sqlite)
    assert find(sqlite, "Deployment")["spec"]["replicas"] == 1
    postgres, _ = render(chart, VALUE_SETS["postgresql-3-replicas"])
    assert "PersistentVolumeClaim" not in kinds(postgres)
    assert find(postgres, "Deployment")["spec"]["replicas"] == 3
    # The values in the files are the whole story: nothing else is needed but the IdP secret.
    assert VALUE_SETS["postgresql-3-replicas"] == merged(
        yaml.safe_load((EXAMPLES / "tokenhub-postgresql.yaml").read_text()), {"oidc": {"clientSecret": "oidc-test-secret"}}
    )
