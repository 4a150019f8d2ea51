"""Issue 9 in the real stack: only a token meant for tokenhub reads a user's
tokens (the `access:services!service=tokenhub` scope), and script on a page
of the hub's shared origin (a user's own server) cannot read tokens or the
CSRF value from tokenhub, while the user's own download still works."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
import urllib.request

from conftest import log_in_and_spawn, remember, tokenhub_call

SCOPE = "access:services!service=tokenhub"


def spawned(stack, browser, hub, user):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    log_in_and_spawn(page, stack, user)
    env = hub.server_env(user)
    remember(env["JUPYTERHUB_API_TOKEN"], env["CILOGON_REFRESH_TOKEN"])
    return context, page, env


def personal_token(hub, user: str, scopes: list[str]) -> str:
    token = hub.personal_token(user, scopes)
    remember(token)
    return token


def test_only_tokens_meant_for_tokenhub_read_tokens(stack, browser, hub):
    context, page, env = spawned(stack, browser, hub, "sara")
    # The server's own JUPYTERHUB_API_TOKEN still works.
    status, body, _ = tokenhub_call(stack, env["JUPYTERHUB_API_TOKEN"], "GET", "/api/v1/tokens")
    assert status == 200, body
    assert body["user"] == "sara"
    remember(body["access_token"], body["id_token"], body["refresh_token"])

    # A personal token with a narrow scope: 403 naming the scope it lacks.
    narrow = personal_token(hub, "sara", ["read:users:activity!user"])
    status, body, _ = tokenhub_call(stack, narrow, "GET", "/api/v1/tokens")
    assert status == 403, body
    assert body["error"] == "insufficient_scope"
    assert SCOPE in body["error_description"]
    assert "access_token" not in body

    # A personal token made with the scope (how a user reaches tokenhub from
    # outside a server) works.
    wide = personal_token(hub, "sara", [SCOPE])
    status, body, _ = tokenhub_call(stack, wide, "GET", "/api/v1/tokens")
    assert status == 200, body
    assert body["user"] == "sara"
    context.close()


def other_client_token(stack, browser, user: str) -> str:
    """Bob signs in to another OAuth client of the hub (the test service
    `e2e-other-client`, whose callback is a small HTTP server here): the hub
    issues a token naming Bob to that client."""
    redirect = stack.extra_env["HUB_TEST_OAUTH_CLIENT_REDIRECT"]
    captured = {}

    class Callback(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            if url.path == callback_path:  # not the browser's /favicon.ico
                captured.setdefault("query", url.query)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    port = urllib.parse.urlparse(redirect).port
    callback_path = urllib.parse.urlparse(redirect).path
    server = http.server.HTTPServer(("127.0.0.1", port), Callback)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        log_in_and_spawn(page, stack, user)
        query = urllib.parse.urlencode(
            {"client_id": "service-e2e-other-client", "redirect_uri": redirect, "response_type": "code", "state": "s1"}
        )
        page.goto(f"{stack.hub_url}/hub/api/oauth2/authorize?{query}")
        assert "query" in captured, f"the hub did not send the browser to the client: {page.url} {page.inner_text('body')[:1500]}"
        context.close()
    finally:
        server.shutdown()
        server.server_close()
    answer = urllib.parse.parse_qs(captured["query"])
    assert "code" in answer, f"the hub answered the client with {sorted(answer)}"
    code = answer["code"][0]
    form = urllib.parse.urlencode(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect,
            "client_id": "service-e2e-other-client",
            "client_secret": stack.extra_env["HUB_TEST_OAUTH_CLIENT_SECRET"],
        }
    ).encode()
    with urllib.request.urlopen(f"{stack.hub_url}/hub/api/oauth2/token", data=form, timeout=30) as r:
        token = json.loads(r.read())["access_token"]
    remember(token)
    return token


def test_a_token_issued_for_bob_to_another_client_is_refused(stack, browser):
    token = other_client_token(stack, browser, "bob")
    # The hub knows the token and says it names bob ...
    req = urllib.request.Request(f"{stack.hub_url}/hub/api/user", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        model = json.loads(r.read())
    assert model["name"] == "bob"
    assert SCOPE not in model.get("scopes", [])
    # ... but it was not meant for tokenhub.
    status, body, _ = tokenhub_call(stack, token, "GET", "/api/v1/tokens")
    assert status == 403, body
    assert body["error"] == "insufficient_scope" and SCOPE in body["error_description"]
    assert "refresh_token" not in body


ATTACK = """
async () => {
  const out = {};
  for (const url of ['/services/tokenhub/tokens.json', '/services/tokenhub/']) {
    try {
      const r = await fetch(url, {credentials: 'include'});
      out[url] = {status: r.status, body: await r.text()};
    } catch (e) {
      out[url] = {error: String(e)};
    }
  }
  const frame = document.createElement('iframe');
  frame.src = '/services/tokenhub/';
  const loaded = new Promise((resolve) => { frame.onload = resolve; setTimeout(resolve, 5000); });
  document.body.appendChild(frame);
  await loaded;
  try {
    const doc = frame.contentDocument;
    out.iframe = doc ? doc.documentElement.outerHTML : 'no document';
  } catch (e) {
    out.iframe = 'blocked: ' + e;
  }
  return out;
}
"""


def test_same_origin_script_reads_no_token_and_the_download_still_works(stack, browser, hub):
    context, page, env = spawned(stack, browser, hub, "mallory")
    server_token = env["JUPYTERHUB_API_TOKEN"]
    # What the user's tokenhub page carries: the CSRF value; the tokens.
    page.goto(f"{stack.tokenhub_url}/")
    csrf = page.locator("input[name=csrf]").get_attribute("value")
    assert csrf and len(csrf) >= 16
    status, tokens, _ = tokenhub_call(stack, server_token, "GET", "/api/v1/tokens")
    assert status == 200
    secrets = [tokens["access_token"], tokens["id_token"], tokens["refresh_token"], csrf]
    remember(*secrets[:3])

    # An HTML file served by the user's own server, written through its Contents API.
    html = "<!doctype html><html><head><title>shared page</title></head><body><p>hello</p></body></html>"
    req = urllib.request.Request(
        f"{stack.hub_url}/user/mallory/api/contents/attack.html",
        method="PUT",
        data=json.dumps({"type": "file", "format": "text", "content": html}).encode(),
        headers={"Authorization": f"token {server_token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status in (200, 201)

    # Script on pages of the shared origin: the served file and JupyterLab itself.
    results = {}
    for url in (f"{stack.hub_url}/user/mallory/files/attack.html", f"{stack.hub_url}/user/mallory/lab"):
        attacker = context.new_page()
        attacker.goto(url)
        results[url] = attacker.evaluate(ATTACK)
        attacker.close()
    text = json.dumps(results)
    for secret in secrets:
        assert secret not in text, f"script on the shared origin saw a secret: {text[:2000]}"
    lab = results[f"{stack.hub_url}/user/mallory/lab"]
    assert lab["/services/tokenhub/tokens.json"].get("status") == 403, lab
    assert lab["/services/tokenhub/"].get("status") == 403, lab

    # The user clicks the download link on the token page: it still works.
    page.goto(f"{stack.tokenhub_url}/")
    with page.expect_download() as download_info:
        page.click("#download")
    document = json.loads(open(download_info.value.path()).read())
    assert document["refresh_token"] == tokens["refresh_token"]
    assert document["created_from"] == "tokenhub"

    # The revoke form works from the page (Origin is tokenhub's) and is
    # audited; the tokens are gone afterwards.
    page.goto(f"{stack.tokenhub_url}/")
    page.click("#revoke")
    page.wait_for_load_state()
    assert "Tokens revoked" in page.content()
    status, body, _ = tokenhub_call(stack, server_token, "GET", "/api/v1/tokens")
    assert status == 401 and body["error"] == "invalid_grant", body
    context.close()
