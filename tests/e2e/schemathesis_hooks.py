"""schemathesis hooks for test_zs_schemathesis.py: a check that no error
answer carries a token value (the tokens the test fetched are given in
TOKENHUB_E2E_SECRETS, a JSON list)."""

import json
import os

import schemathesis

SECRETS = [s for s in json.loads(os.environ.get("TOKENHUB_E2E_SECRETS", "[]")) if len(s) >= 16]


@schemathesis.check
def no_token_in_errors(ctx, response, case):
    if response.status_code < 400:
        return None
    body = response.text or ""
    leaked = [s[:6] + "…" for s in SECRETS if s in body]
    if leaked:
        raise AssertionError(f"an error answer ({response.status_code}) carries token values: {leaked}")
    return None
