"""A spec-strict identity provider, with tokenhub's default settings: the
test IdP (oidc-provider) issues refresh tokens only for `offline_access`,
grants that only with `prompt=consent`, and answers an authorization request
for `offline_access` without it with `error=invalid_request`, as strict
providers do (IDP_STRICT_OFFLINE=1, IDP_REFUSE_OFFLINE_WITHOUT_CONSENT=1).

A user signs in to the hub in chromium and ends signed in with a refresh
token after two trips to the IdP (the refused one and the one tokenhub makes
by itself with prompt=consent); /refresh with tokenhub's session refreshes
without a trip, and without one it stays silent: one trip, no consent asked,
and the page says the IdP did not sign the person in."""

from __future__ import annotations

import json
import re
import tempfile
import urllib.request
from pathlib import Path

import pytest
from conftest import Hub, remember, start_stack, tokenhub_call, wait_for_text

SCOPE = "access:services!service=tokenhub"


@pytest.fixture(scope="module")
def stack():
    state = Path(tempfile.mkdtemp(prefix="tokenhub-e2e-strict-"))
    s = start_stack(state, idp_env={"IDP_STRICT_OFFLINE": "1", "IDP_REFUSE_OFFLINE_WITHOUT_CONSENT": "1"})
    yield s
    s.stop()


def authorizations(stack) -> tuple[int, int]:
    """Authorization requests the IdP received, and how many it refused."""
    with urllib.request.urlopen(f"{stack.idp_url}/_test/stats", timeout=10) as r:
        counters = json.loads(r.read())
    return counters.get("authorization", 0), counters.get("authorization_refused", 0)


def test_a_hub_login_at_a_strict_provider_brings_a_refresh_token(stack, browser):
    asked, refused = authorizations(stack)
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{stack.hub_url}/hub/login?next=%2Fhub%2Fhome")
    page.click("a:has-text('Sign in with')")
    page.wait_for_selector("#login", timeout=30_000)  # the IdP's form, after its first refusal
    page.fill("#login", "stella")
    page.fill("#password", "anything")
    page.click("#submit")
    page.wait_for_url(re.compile(r".*/hub/home.*"), timeout=60_000)
    assert authorizations(stack) == (asked + 2, refused + 1), "two trips: refused, then with prompt=consent"

    token = Hub(stack).personal_token("stella", [SCOPE])
    status, tokens, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
    assert status == 200 and tokens["refresh_token"], tokens
    status, refreshed, _ = tokenhub_call(stack, token, "POST", "/api/v1/tokens/refresh")
    assert status == 200 and refreshed["refresh_token"] != tokens["refresh_token"], refreshed
    remember(tokens["access_token"], tokens["refresh_token"], refreshed["access_token"], refreshed["refresh_token"])

    # /refresh with tokenhub's session (set at the sign-in): a refresh, no trip.
    page.goto(f"{stack.tokenhub_url}/refresh")
    wait_for_text(page, "Your tokens were renewed")
    assert authorizations(stack) == (asked + 2, refused + 1)
    context.close()


def test_refresh_without_a_session_stays_silent(stack, browser):
    asked, refused = authorizations(stack)
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{stack.tokenhub_url}/refresh")
    wait_for_text(page, "did not sign you in")
    assert "invalid_request" in page.inner_text("body")
    assert authorizations(stack) == (asked + 1, refused + 1), "one silent trip, no second one asking for consent"
    context.close()
