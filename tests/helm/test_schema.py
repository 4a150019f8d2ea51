"""The values schema: values.schema.json is what scripts/gen-helm.py makes of
values.schema.yaml, and it refuses bad values with a message that says what
is wrong (and, for replicas with SQLite, why)."""

import json
import subprocess
import sys

import helm_python as helm
import jsonschema
import pytest
import yaml

from chart_support import CHART_DIR, REQUIRED, ROOT, VALUE_SETS, merged

SQLITE_REPLICAS = (
    "replicas > 1 needs PostgreSQL (database.url or database.existingSecret): "
    "SQLite is one file on one volume that only one pod can use"
)


def test_generated_files_are_current():
    # values.schema.json, the chart's copy of the hub block, the example hub values.
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-helm.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_json_schema_is_the_yaml_without_descriptions():
    authored = yaml.safe_load((CHART_DIR / "values.schema.yaml").read_text())
    shipped = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert "description" in json.dumps(authored) and '"description"' not in json.dumps(shipped)
    jsonschema.Draft7Validator.check_schema(shipped)
    assert shipped["properties"].keys() == authored["properties"].keys()


def test_every_value_is_in_the_schema(chart):
    # additionalProperties: false everywhere: the defaults themselves must pass,
    # and every default key must be declared.
    chart.validate_schema({})
    schema = chart.schema

    def walk(values, node, path):
        props = node.get("properties", {})
        for key, value in values.items():
            assert key in props, f"{path}{key} is not in values.schema.yaml"
            sub = props[key]
            if "$ref" in sub:
                sub = schema["definitions"][sub["$ref"].rsplit("/", 1)[1]]
            if isinstance(value, dict) and sub.get("properties"):
                walk(value, sub, f"{path}{key}.")

    walk(chart.values, schema, "")


def refused(chart, values):
    """Helm's message for `values` (the one `helm install` prints)."""
    with pytest.raises(helm.HelmValuesError) as failure:
        chart.validate_schema(values)
    return str(failure.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": "three"}, "at '/replicas': got string, want integer"),
        ({"replicas": -1}, "at '/replicas': minimum: got -1, want 0"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
        ({"log": {"format": "xml"}}, "at '/log/format': value must be one of 'text', 'json'"),
        ({"publicUrl": "hub.example.org"}, "at '/publicUrl': 'hub.example.org' does not match pattern"),
        ({"database": {"url": "mysql://x"}}, "at '/database/url': 'mysql://x' does not match pattern"),
        ({"oidc": {"clientAuthMethod": "private_key_jwt"}}, "at '/oidc/clientAuthMethod': value must be one of"),
        ({"jupyterhub": {"tokenTtl": "1h"}}, "at '/jupyterhub/tokenTtl': got string, want null or integer"),
        ({"replica": 2}, "at '': additional properties 'replica' not allowed"),
        ({"oidc": {"issuerUrl": "https://x"}}, "at '/oidc': additional properties 'issuerUrl' not allowed"),
        ({"persistence": {"enabled": False}}, "at '/persistence': additional properties 'enabled' not allowed"),
        ({"trustedProxies": ["proxy-public"]}, "at '/trustedProxies/0': 'proxy-public' does not match pattern"),
        ({"trustedProxies": "10.0.0.0/8"}, "at '/trustedProxies': got string, want array"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(chart, values, message):
    assert message in refused(chart, merged(REQUIRED, values))


@pytest.mark.parametrize(
    "values",
    [
        {"replicas": 3},
        {"replicas": 2, "database": {"url": "sqlite:///data/tokenhub.sqlite?mode=rwc"}},
    ],
)
def test_replicas_above_one_with_sqlite_are_refused_saying_why(chart, values):
    message = refused(chart, merged(REQUIRED, values))
    assert f"missing property '{SQLITE_REPLICAS}'" in message
    # The same refusal stops a render (helm install / template).
    with pytest.raises(helm.HelmValuesError, match="SQLite is one file on one volume"):
        chart.render(merged(REQUIRED, values), name="tokenhub")


@pytest.mark.parametrize(
    "values",
    [
        {"replicas": 1},
        {"replicas": 0},
        {"replicas": 3, "database": {"url": "postgres://u:p@db:5432/tokenhub"}},
        {"replicas": 3, "database": {"url": "postgresql://u:p@db/tokenhub"}},
        {"replicas": 5, "database": {"existingSecret": {"name": "db", "key": "url"}}},
        {"trustedProxies": ["10.244.0.0/16", "192.168.1.5", "fd00::/8"]},
    ],
)
def test_good_values_pass(chart, values):
    chart.validate_schema(merged(REQUIRED, values))


def test_python_jsonschema_agrees():
    # Another validator reading the same schema: refuses the same values.
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for values in VALUE_SETS.values():
        assert not list(validator.iter_errors(merged(defaults, values)))
    errors = [e.message for e in validator.iter_errors(merged(defaults, {"replicas": 3}))]
    assert errors == [f"'{SQLITE_REPLICAS}' is a required property"]
