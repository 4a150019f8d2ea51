"""Property-based fuzzing of tokenhub's JSON API (the OpenAPI document it
serves at /api/v1/openapi.json) with schemathesis, in the real stack and with
a real server token, so the authenticated paths run too. Bounded: a fixed
number of examples per operation. Asserts: no 5xx, every answer conforms to
the document (status, content type, schema), and no error carries a token
value."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

from conftest import log_in_and_spawn, remember, tokenhub_call

HERE = Path(__file__).resolve().parent
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "no_token_in_errors",
]


def test_schemathesis_finds_no_failure(stack, browser, hub, tmp_path):
    context = browser.new_context()
    log_in_and_spawn(context.new_page(), stack, "fuzzy")
    token = hub.server_env("fuzzy")["JUPYTERHUB_API_TOKEN"]
    status, tokens, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
    assert status == 200, tokens
    secrets = [token, tokens["access_token"], tokens["id_token"], tokens["refresh_token"], stack.hub_client_secret]
    remember(*secrets[:4])
    context.close()

    hub_basic = base64.b64encode(
        f"jupyterhub:{urllib.parse.quote_plus(stack.hub_client_secret)}".encode()
    ).decode()
    # The hub's endpoints with the hub's client credentials, then the
    # notebook API (and the rest) with the server's token: each run sends
    # credentials its operations accept, so the logic behind them is
    # exercised rather than only the refusals.
    hub_ops = r"^/(api/v1/hub/spawn|oauth2/token)$"
    reports = [
        run_schemathesis(stack, tmp_path, secrets, f"Basic {hub_basic}", ["--include-path-regex", hub_ops]),
        run_schemathesis(stack, tmp_path, secrets, f"token {token}", ["--exclude-path-regex", hub_ops]),
    ]
    for returncode, report in reports:
        report = report.replace(token, "<server token>").replace(hub_basic, "<hub credentials>")
        print(report[-3000:])  # the summary, shown with -s
        assert returncode == 0, report[-8000:]
        assert re.search(r"\d+ generated, \d+ passed", report), report[-3000:]


def run_schemathesis(stack, cwd, secrets, authorization: str, selection: list[str]) -> tuple[int, str]:
    st = Path(sys.executable).parent / "st"
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": str(HERE),
        "TOKENHUB_E2E_SECRETS": json.dumps(secrets),
    }
    command = [
        str(st), "run", f"{stack.tokenhub_url}/api/v1/openapi.json",
        *selection,
        "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "30",
        "--workers", "1",
        "--header", f"Authorization: {authorization}",
        "--request-timeout", "30",
        "--seed", "9",
        "--no-color",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    return result.returncode, result.stdout + result.stderr
