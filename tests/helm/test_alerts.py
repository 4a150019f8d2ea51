"""tokenhub's alert rules (helm/tokenhub/files/alerts.yaml): a valid
Prometheus rule file whose expressions parse (promql-parser, the PromQL
grammar in Rust), the PrometheusRule the chart renders from it unchanged,
and the README showing the same rules. (test_boot checks that the metrics
the rules name are served by the real binary.)"""

import re

import promql_parser
import pytest
import yaml

from chart_support import ALERTS, ROOT, VALUE_SETS, alert_rules, find, render

RULES = yaml.safe_load(ALERTS.read_text())
DURATION = re.compile(r"\d+[smhdwy]")


@pytest.mark.parametrize("rule", alert_rules(RULES), ids=lambda rule: rule["alert"])
def test_each_rule_is_a_complete_alert_with_valid_promql(rule):
    assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
    assert re.fullmatch(r"Tokenhub[A-Za-z]+", rule["alert"])
    assert DURATION.fullmatch(rule["for"])
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"]
    promql_parser.parse(rule["expr"])  # raises on a syntax error


def test_the_parser_refuses_broken_promql():
    """So that the parse above means something."""
    for broken in ("sum(rate(tokenhub_upstream_refreshes_total[10m])", "tokenhub_lineages{state=dead}", "rate(x[10q])"):
        with pytest.raises(Exception):
            promql_parser.parse(broken)


def test_the_chart_renders_the_rules_unchanged(chart):
    objects, _ = render(chart, VALUE_SETS["servicemonitor-ingress"])
    rule = find(objects, "PrometheusRule")
    # A CRD: no Kubernetes schema to validate against, so its shape is checked here.
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == RULES, "Prometheus' {{ $value }} templates pass through Helm untouched"
    off, _ = render(chart, VALUE_SETS["sqlite-example"])
    assert "PrometheusRule" not in {o["kind"] for o in off}


def test_the_readme_shows_the_rules():
    readme = (ROOT / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(groups:.*?)```", readme, re.S)]
    assert RULES in blocks, "README's Metrics section shows helm/tokenhub/files/alerts.yaml"
