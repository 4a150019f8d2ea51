"""Tokens for running notebooks, in the real stack: min_valid refreshes, one
upstream refresh for 100 concurrent callers, the just-rotated refresh token,
repair through /refresh after the grant is killed at the IdP, and an IdP
outage that kills nothing."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from conftest import (
    idp_refreshes,
    log_in_and_spawn,
    remember,
    tokenhub_call,
    tokenhub_tokens,
    wait_for_file,
)


def spawned(stack, browser, hub, user):
    context = browser.new_context()
    page = context.new_page()
    log_in_and_spawn(page, stack, user)
    env = hub.server_env(user)
    remember(env["JUPYTERHUB_API_TOKEN"], env["CILOGON_REFRESH_TOKEN"])
    return context, page, env


def wait_until_remaining_below(stack, token: str, seconds: int) -> dict:
    """Waits (bounded) until the access token has less than `seconds` left."""
    deadline = time.monotonic() + 60
    while True:
        current = tokenhub_tokens(stack, token)
        if current["expires_in"] < seconds:
            return current
        assert time.monotonic() < deadline
        time.sleep(min(5, current["expires_in"] - seconds + 1))


def test_min_valid_refreshes_and_the_file_follows(stack, browser, hub):
    context, _, env = spawned(stack, browser, hub, "yuki")
    token = env["JUPYTERHUB_API_TOKEN"]
    first = tokenhub_tokens(stack, token)
    remember(first["access_token"], first["id_token"])
    assert first["user"] == "yuki" and first["expires_in"] > 0 and not first["refreshed"]
    assert first["refresh_token"] == env["CILOGON_REFRESH_TOKEN"]

    current = wait_until_remaining_below(stack, token, 100)
    before = idp_refreshes(stack, "yuki")
    refreshed = tokenhub_tokens(stack, token, "?min_valid=110")
    remember(refreshed["access_token"], refreshed["refresh_token"], refreshed["id_token"])
    assert refreshed["refreshed"]
    assert refreshed["access_token"] != current["access_token"]
    assert refreshed["refresh_token"] != current["refresh_token"], "rotation is on"
    assert refreshed["expires_in"] >= 100
    assert idp_refreshes(stack, "yuki") - before == 1
    # The running server's token file never keeps the rotated-away token.
    document = wait_for_file(env["FABRIC_TOKEN_LOCATION"], lambda d: d["refresh_token"] == refreshed["refresh_token"])
    assert document["state"] == "Refreshed"
    context.close()


def test_100_concurrent_callers_share_one_refresh(stack, browser, hub):
    context, _, env = spawned(stack, browser, hub, "zack")
    token = env["JUPYTERHUB_API_TOKEN"]
    old = wait_until_remaining_below(stack, token, 100)
    before = idp_refreshes(stack, "zack")

    def call(_):
        return tokenhub_call(stack, token, "GET", "/api/v1/tokens?min_valid=110")

    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(call, range(100)))
    statuses = [status for status, _, _ in answers]
    assert statuses == [200] * 100, statuses
    access = {body["access_token"] for _, body, _ in answers}
    refresh = {body["refresh_token"] for _, body, _ in answers}
    assert len(access) == 1 and len(refresh) == 1, "all callers got the same new tokens"
    assert idp_refreshes(stack, "zack") - before == 1, "exactly one upstream refresh"
    (new_refresh,) = refresh
    remember(new_refresh, *access)

    # A kernel still holding the just-rotated refresh token gets the current set.
    status, body, _ = tokenhub_call(stack, token, "POST", "/api/v1/tokens/refresh", {"refresh_token": old["refresh_token"]})
    assert status == 200, body
    assert body["refresh_token"] == new_refresh
    assert idp_refreshes(stack, "zack") - before == 1, "no upstream call for it"
    context.close()


def test_killed_grant_is_repaired_through_the_refresh_url(stack, browser, hub):
    from fabrictestbed.fabric_manager_v2 import FabricManagerV2

    context, page, env = spawned(stack, browser, hub, "kim")
    token = env["JUPYTERHUB_API_TOKEN"]
    path = env["FABRIC_TOKEN_LOCATION"]
    old = tokenhub_tokens(stack, token)
    wait_for_file(path, lambda d: d["refresh_token"] == old["refresh_token"])
    urllib.request.urlopen(urllib.request.Request(f"{stack.idp_url}/_test/kill?account=kim", method="POST"), timeout=10)

    status, body, _ = tokenhub_call(stack, token, "POST", "/api/v1/tokens/refresh")
    assert status == 401, body
    assert body["error"] == "invalid_grant"
    assert body["reauth_url"] == f"{stack.tokenhub_url}/refresh"

    # The user opens the URL in the browser: a silent new login at the IdP.
    page.goto(body["reauth_url"])
    page.wait_for_selector("#renewed-title", timeout=60_000)
    assert "default server" in page.inner_text("#renewed-servers")

    status, renewed, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
    assert status == 200, renewed
    remember(renewed["refresh_token"], renewed["access_token"], renewed["id_token"])
    assert renewed["refresh_token"] != old["refresh_token"]
    # The still-running server's file holds the new lineage, and FABlib reads it.
    wait_for_file(path, lambda d: d["refresh_token"] == renewed["refresh_token"])
    manager = FabricManagerV2(credmgr_host="127.0.0.1:9", orchestrator_host="127.0.0.1:9", token_location=path, auto_refresh=False)
    assert manager.get_refresh_token() == renewed["refresh_token"]
    # And the API refreshes again.
    status, body, _ = tokenhub_call(stack, token, "POST", "/api/v1/tokens/refresh")
    assert status == 200, body
    remember(body["refresh_token"], body["access_token"])
    context.close()


def test_idp_outage_kills_nothing(stack, browser, hub):
    context, _, env = spawned(stack, browser, hub, "lee")
    token = env["JUPYTERHUB_API_TOKEN"]
    valid = tokenhub_tokens(stack, token)
    stack.stop_idp()
    try:
        # Still-valid tokens keep being served.
        status, body, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
        assert status == 200 and body["access_token"] == valid["access_token"]
        # A needed refresh gets 503 with Retry-After; the lineage survives.
        status, body, headers = tokenhub_call(stack, token, "POST", "/api/v1/tokens/refresh")
        assert status == 503, body
        assert body["error"] == "temporarily_unavailable"
        assert headers["Retry-After"]
    finally:
        stack.start_idp()
    status, body, _ = tokenhub_call(stack, token, "POST", "/api/v1/tokens/refresh")
    assert status == 200, body
    assert body["refreshed"] and body["refresh_token"] != valid["refresh_token"]
    remember(body["refresh_token"], body["access_token"])
    context.close()
