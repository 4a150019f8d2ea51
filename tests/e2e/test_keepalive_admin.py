"""Issue 8 in the real stack: keep-alive, the operator's view and the metrics.

A stack of its own whose identity provider lets a refresh token die after
IDLE seconds unused (oidc-provider's `ttl.RefreshToken`; each refresh issues a
new token, so the lifetime acts as an idle timeout), and tokenhub told that
idle timeout. The tests run in order on that stack:

1. alice's server runs untouched for three idle periods while bob, who has no
   server, idles too: alice's tokens still work and her token file moved on;
   bob's lineage died.
2. A hub admin sees both in the operator's page in chromium; an operator by
   the IdP's group reads the JSON; bob gets 403 for the page and the JSON;
   the admin revokes alice from the page and alice's notebook gets
   `invalid_grant` with `reauth_url`.
3. `/metrics` shows what those tests did.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    Hub,
    credentials_owned_by,
    idp_refreshes,
    idp_stats,
    leaked,
    log_in,
    log_in_and_spawn,
    plant_recorder,
    recorded,
    stack_logs,
    start_stack,
    tokenhub_call,
    tokenhub_tokens,
    vault_bytes,
    wait_for_file,
)
# Prometheus' own OpenMetrics parser (prometheus_client comes with JupyterHub).
from prometheus_client.openmetrics.parser import text_string_to_metric_families

IDLE = 15  # seconds a refresh token lives unused, at the IdP and in tokenhub's setting
SCOPE = "access:services!service=tokenhub"

# Token values the tests saw, for the leak check at the end.
SEEN: set[str] = set()


def seen(*values) -> None:
    SEEN.update(v for v in values if isinstance(v, str) and len(v) >= 16)


@pytest.fixture(scope="module")
def stack():
    state = Path(tempfile.mkdtemp(prefix="tokenhub-e2e-keepalive-"))
    s = start_stack(
        state,
        # Access tokens outlive the test: every refresh the IdP counts is keep-alive's.
        access_token_ttl=600,
        idp_env={"IDP_REFRESH_TOKEN_TTL": str(IDLE)},
        extra_env={
            "TOKENHUB_KEEPALIVE_INTERVAL": "2",
            "TOKENHUB_KEEPALIVE_IDLE_TIMEOUT": str(IDLE),
            "TOKENHUB_KEEPALIVE_MARGIN": "6",
            "TOKENHUB_AUDIT_LOG": str(state / "audit.jsonl"),
        },
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


@pytest.fixture(scope="module")
def people(stack, browser, hub):
    """alice signs in and her server starts, then she closes the browser; bob,
    the admin and the operator sign in without a server. Returns alice's
    server environment, the first token file seen in it (keep-alive may have
    rewritten it already while the server started) and when she was in."""
    contexts = {name: browser.new_context() for name in ("alice", "bob", "admin-kim", "operator-oz")}
    # alice's server records every credential that reaches it (as anyone can).
    recording = plant_recorder(stack, "alice")
    signing_in = time.time()
    log_in_and_spawn(contexts["alice"].new_page(), stack, "alice")
    started = time.time()
    env = hub.server_env("alice")
    seen(env["JUPYTERHUB_API_TOKEN"], env["CILOGON_REFRESH_TOKEN"])
    first = wait_for_file(env["FABRIC_TOKEN_LOCATION"], lambda d: bool(d.get("refresh_token")))
    contexts["alice"].close()  # the user closed the laptop: nothing touches her server from here
    log_in(contexts["bob"].new_page(), stack, "bob")
    log_in(contexts["admin-kim"].new_page(), stack, "admin-kim")
    log_in(contexts["operator-oz"].new_page(), stack, "operator-oz")
    yield {"recording": recording, "env": env, "first_file": first, "signing_in": signing_in, "started": started, "bob": contexts["bob"], "admin": contexts["admin-kim"]}
    for context in contexts.values():
        try:
            context.close()
        except Exception:
            pass


def file_time(document: dict) -> datetime.datetime:
    return datetime.datetime.strptime(document["created_at"], "%Y-%m-%d %H:%M:%S %z")


def idp_refresh(stack, refresh_token: str) -> tuple[int, dict]:
    """A refresh-token grant straight at the IdP's token endpoint, as tokenhub's client."""
    with urllib.request.urlopen(f"{stack.idp_url}/.well-known/openid-configuration", timeout=10) as r:
        endpoint = json.loads(r.read())["token_endpoint"]
    basic = base64.b64encode(f"tokenhub:{stack.idp_client_secret}".encode()).decode()
    req = urllib.request.Request(
        endpoint,
        method="POST",
        data=urllib.parse.urlencode({"grant_type": "refresh_token", "refresh_token": refresh_token}).encode(),
        headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_running_server_keeps_its_tokens_alive_and_an_idle_user_is_let_go(stack, hub, people):
    env = people["env"]
    api_token = env["JUPYTERHUB_API_TOKEN"]
    bob_token = hub.personal_token("bob", [SCOPE])
    seen(bob_token)

    # Three idle periods from alice's running server on, nobody using anyone's tokens.
    time.sleep(max(0.0, people["started"] + 3 * IDLE + 2 - time.time()))

    # Keep-alive refreshed alice's lineage at the IdP several times (at most
    # every 6 s: the idle period less the margin and the user's spread), not
    # once per 2 s round; bob runs no server and was left alone.
    alice_refreshes = idp_refreshes(stack, "alice")
    window = time.time() - people["signing_in"]
    assert 3 <= alice_refreshes <= window // 6 + 1, f"{alice_refreshes} refreshes in {window:.0f} s"
    assert idp_refreshes(stack, "bob") == 0, "bob has no server: not kept alive"

    # The API and the token file in alice's server hold the current tokens,
    # and the file was rewritten after the login's (created_at moved on).
    current = tokenhub_tokens(stack, api_token)
    seen(current["refresh_token"], current["access_token"], current["id_token"])
    assert current["refresh_token"] != env["CILOGON_REFRESH_TOKEN"], "the login's refresh token was rotated"
    document = wait_for_file(env["FABRIC_TOKEN_LOCATION"], lambda d: d.get("refresh_token") == current["refresh_token"])
    assert file_time(document) > file_time(people["first_file"])
    assert document["state"] == "Refreshed"
    # Keep-alive's rewrites reached the server with its own token alone.
    records = recorded(people["recording"])
    rewrites = [r for r in records if r["method"] == "PUT" and r["path"].endswith(".tokens.json")]
    assert len(rewrites) >= 3, f"{len(rewrites)} token files written"
    assert {r["authorization"] for r in rewrites} == {f"token {api_token}"}
    assert set(credentials_owned_by(stack, records).values()) == {"alice"}
    assert idp_refreshes(stack, "alice") == alice_refreshes, "reading the tokens refreshed nothing"

    # The IdP takes the file's refresh token: a refresh through tokenhub's API
    # sends exactly that token, and succeeds.
    status, body, _ = tokenhub_call(stack, api_token, "POST", "/api/v1/tokens/refresh")
    assert status == 200, body
    seen(body["refresh_token"], body["access_token"], body["id_token"])
    assert idp_refreshes(stack, "alice") == alice_refreshes + 1
    assert body["refresh_token"] != document["refresh_token"]

    # bob's refresh token died unused: his first refresh meets invalid_grant.
    status, body, _ = tokenhub_call(stack, bob_token, "POST", "/api/v1/tokens/refresh")
    assert status == 401 and body["error"] == "invalid_grant", body
    assert body["reauth_url"].endswith("/refresh"), body


def lineage_rows(page) -> dict[str, dict]:
    rows = {}
    for row in page.locator("tr.lineage").all():
        rows[row.get_attribute("data-user")] = {
            "state": row.locator("td.state").inner_text(),
            "keepalive": row.locator("td.keepalive").inner_text(),
        }
    return rows


def test_the_operators_page_lists_users_refuses_others_and_revokes(stack, hub, people):
    admin_page = people["admin"].new_page()
    response = admin_page.goto(f"{stack.tokenhub_url}/admin")
    assert response.status == 200
    rows = lineage_rows(admin_page)
    assert set(rows) == {"alice", "bob", "admin-kim", "operator-oz"}, rows
    assert rows["alice"]["state"] == "active"
    assert rows["alice"]["keepalive"].startswith("on:"), rows["alice"]
    # The IdP's own error and description are the reason.
    assert rows["bob"]["state"].startswith("dead: the identity provider refused the refresh: invalid_grant"), rows["bob"]
    assert rows["bob"]["keepalive"].startswith("none:")
    assert "alice" in admin_page.locator("tr.lineage[data-user=alice]").inner_text()
    # What keep-alive did, as in /metrics: rounds ran, alice was refreshed.
    figures = admin_page.inner_text("#keepalive-figures")
    rounds = re.search(r"Keep-alive on this replica: (\d+) rounds, (\d+) refreshes, failed refreshes: none;", figures)
    assert rounds and int(rounds.group(1)) > 0 and int(rounds.group(2)) >= 3, figures
    assert "the last round ended" in figures, figures
    # The state filter, as the operator uses it.
    admin_page.select_option("#filter select[name=state]", "dead")
    admin_page.click("#filter button[type=submit]")
    admin_page.wait_for_url("**state=dead**")
    assert set(lineage_rows(admin_page)) == {"bob"}

    # The same as JSON, for the admin's own token.
    admin_token = hub.personal_token("admin-kim", [SCOPE])
    status, listing, _ = tokenhub_call(stack, admin_token, "GET", "/api/v1/admin/lineages?sort=user")
    assert status == 200, listing
    states = {row["user"]: row["state"] for row in listing["lineages"]}
    assert states == {"admin-kim": "active", "alice": "active", "bob": "dead", "operator-oz": "active"}, states

    # An operator who is no hub admin, by the IdP's group "tokenhub-operators"
    # and the role jupyterhub_config.py grants that group: the JSON answers.
    operator_token = hub.personal_token("operator-oz", ["custom:tokenhub:admin", SCOPE])
    status, listing, _ = tokenhub_call(stack, operator_token, "GET", "/api/v1/admin/lineages?state=dead")
    assert status == 200, listing
    assert [row["user"] for row in listing["lineages"]] == ["bob"]

    # bob is no hub admin: 403 for the page (he has a tokenhub session) and the JSON.
    bob_page = people["bob"].new_page()
    response = bob_page.goto(f"{stack.tokenhub_url}/admin")
    assert response.status == 403
    assert "alice" not in bob_page.content()
    bob_token = hub.personal_token("bob", [SCOPE])
    seen(admin_token, bob_token)
    status, body, _ = tokenhub_call(stack, bob_token, "GET", "/api/v1/admin/lineages")
    assert status == 403 and body["error"], body

    # The admin revokes alice from the page: at the IdP, then in the vault.
    admin_page.goto(f"{stack.tokenhub_url}/admin")
    admin_page.click("tr.lineage[data-user=alice] button.revoke")
    admin_page.wait_for_selector("text=Tokens revoked")
    assert "the identity provider revoked the refresh token" in admin_page.content()
    assert idp_stats(stack, "alice").get("revoked") == 1, "the IdP revoked alice's grant"
    admin_page.goto(f"{stack.tokenhub_url}/admin")
    assert set(lineage_rows(admin_page)) == {"bob", "admin-kim", "operator-oz"}

    # alice's notebook now gets invalid_grant with the URL that repairs it,
    # and the IdP refuses the refresh token her file holds.
    status, body, _ = tokenhub_call(stack, people["env"]["JUPYTERHUB_API_TOKEN"], "GET", "/api/v1/tokens")
    assert status == 401 and body["error"] == "invalid_grant", body
    assert body["reauth_url"] == f"{stack.tokenhub_url}/refresh", body
    file_refresh = wait_for_file(people["env"]["FABRIC_TOKEN_LOCATION"], lambda d: True)["refresh_token"]
    status, answer = idp_refresh(stack, file_refresh)
    assert status == 400 and answer["error"] == "invalid_grant", answer

    audit = [json.loads(line) for line in (stack.state_dir / "audit.jsonl").read_text().splitlines() if line.strip()]
    revokes = [line for line in audit if line["event"] == "admin_revoke"]
    assert [line["user"] for line in revokes] == ["alice"], revokes
    assert "admin-kim" in revokes[0]["detail"]
    # It names the version deleted: the one alice's last refresh made.
    refreshed = [line["version"] for line in audit if line["user"] == "alice" and line["event"] in ("refresh", "keepalive_refresh")]
    assert revokes[0]["version"] == max(refreshed), (revokes, refreshed)
    assert any(line["event"] == "keepalive_refresh" and line["user"] == "alice" for line in audit)


def scrape(stack) -> dict[str, float]:
    """Every sample of tokenhub's /metrics, read with Prometheus' own
    OpenMetrics parser, keyed `name{label="value",…}`."""
    with urllib.request.urlopen(f"{stack.tokenhub_url}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_metrics_show_what_happened(stack):
    m = scrape(stack)
    alice_and_bob_refreshes = idp_refreshes(stack, "alice") + idp_refreshes(stack, "bob")
    assert m["tokenhub_logins_total"] == 4
    assert m["tokenhub_keepalive_refreshes_total"] >= 3
    for cause in ("idp_unreachable", "idp_error", "refused", "busy", "misconfigured", "vault"):
        assert m[f'tokenhub_keepalive_failures_total{{cause="{cause}"}}'] == 0, cause
    assert m["tokenhub_keepalive_rounds_total"] >= 1
    assert m["tokenhub_keepalive_last_round_timestamp"] > 0
    # Every refresh the IdP answered alice, plus bob's refused one.
    assert m['tokenhub_upstream_refreshes_total{outcome="ok"}'] == alice_and_bob_refreshes
    assert m['tokenhub_upstream_refreshes_total{outcome="invalid_grant"}'] == 1
    assert m['tokenhub_upstream_refreshes_total{outcome="unavailable"}'] == 0
    assert m["tokenhub_upstream_refresh_duration_seconds_count"] == alice_and_bob_refreshes + 1
    assert m["tokenhub_upstream_refresh_duration_seconds_sum"] > 0
    # alice's lineage was deleted by the revoke; bob's is dead; the admin's
    # and the operator's are active.
    assert m['tokenhub_lineages{state="active"}'] == 2
    assert m['tokenhub_lineages{state="dead"}'] == 1
    # A token file at the spawn and after each of alice's refreshes.
    assert m['tokenhub_token_file_writes_total{outcome="ok"}'] >= m["tokenhub_keepalive_refreshes_total"] + 1
    assert m['tokenhub_token_file_writes_total{outcome="failed"}'] == 0
    for call in ("servers", "write_token_file", "is_admin"):
        assert m[f'tokenhub_hub_call_duration_seconds_count{{call="{call}"}}'] > 0, call


def test_no_token_value_in_the_logs_or_the_database(stack):
    assert len(SEEN) >= 8
    logs = stack_logs(stack, stack.state_dir / "audit.jsonl")
    assert "keep-alive refreshed the user's tokens" in logs
    assert not leaked(SEEN, logs)
    assert not leaked(SEEN, vault_bytes(stack))
