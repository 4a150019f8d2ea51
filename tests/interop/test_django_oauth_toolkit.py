"""tokenhub against a second, independent OpenID provider: django-oauth-toolkit
(tests/interop/idp), with rotating refresh tokens (no grace period), RS256 ID
tokens, a client secret with `+~/=` sent as client_secret_basic, RFC 9207
`iss` in the authorization response, and a signing-key rollover that keeps
the old key in the key set as inactive.

A person signs in to tokenhub's token page through the IdP, tokenhub
refreshes (the refresh token rotates, the old one is dead at the IdP), the
IdP rolls its key over and tokenhub refreshes again (it fetches the key set
again for the new kid), the IdP rolls its key once more before tokenhub may
fetch the key set again (the lineage survives); tokenhub's log, database and
pages hold none of the tokens.

The tests run in order and share one login (module state)."""

from __future__ import annotations

import hashlib
import html
import re
import time
import urllib.parse

import jwt
import requests

USER = "alice"

# What the tests saw, shared in file order.
seen: dict = {"documents": [], "codes": [], "requests_by_test": set(), "pages": []}


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def page_value(page: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</', page, re.S)
    assert m, f"no #{element_id} in the page:\n{page[:2000]}"
    return html.unescape(m.group(1)).strip()


def lineage_rows(page: str) -> dict[str, str]:
    """The token page's lineage table as {heading: text}."""
    table = re.search(r'<table id="lineage">(.*?)</table>', page, re.S)
    assert table, f"the token page shows no lineage:\n{page[:2000]}"
    rows = re.findall(r"<tr><th>(.*?)</th><td[^>]*>(.*?)</td></tr>", table.group(1), re.S)
    return {html.unescape(k): html.unescape(re.sub(r"<[^>]+>", "", v)).strip() for k, v in rows}


def verify_id_token(idp, id_token: str) -> dict:
    """Verifies an ID token as any relying party would: signature against the
    IdP's published key set (by kid), issuer, audience, expiry."""
    kid = jwt.get_unverified_header(id_token)["kid"]
    keys = {k["kid"]: k for k in idp.jwks()["keys"]}
    assert kid in keys, f"the ID token's kid {kid} is not in the IdP's key set {list(keys)}"
    key = jwt.PyJWK(keys[kid]).key
    return jwt.decode(id_token, key, algorithms=["RS256"], audience=idp.client_id, issuer=idp.issuer)


def userinfo(idp, access_token: str) -> requests.Response:
    return requests.get(
        idp.discovery()["userinfo_endpoint"], headers={"Authorization": f"Bearer {access_token}"}, timeout=10
    )


def download(browser, tokenhub) -> dict:
    """The token file from /tokens.json, as the browser downloads it."""
    r = browser.navigate(f"{tokenhub.url}/tokens.json")
    assert r.status_code == 200, r.text[:500]
    assert r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    seen["documents"].append(doc)
    return doc


def token_page(browser, tokenhub) -> dict[str, str]:
    r = browser.navigate(f"{tokenhub.url}/")
    assert r.status_code == 200, r.text[:500]
    assert f"Tokens of {USER}" in r.text
    seen["pages"].append(r.text)
    return lineage_rows(r.text)


def refresh_through_tokenhub(browser, tokenhub) -> None:
    """The person opens /refresh: with a session, tokenhub refreshes now."""
    r = browser.navigate(f"{tokenhub.url}/refresh")
    assert r.status_code == 200, f"/refresh answered {r.status_code}:\n{r.text[:1500]}\n{tokenhub.log.read_text()[-3000:]}"
    seen["pages"].append(r.text)
    assert page_value(r.text, "renewed-title") == "Your tokens were renewed"
    assert "refreshed your tokens at your identity provider" in page_value(r.text, "renewed-how")


def tokenhubs_refresh_requests(idp) -> list[dict]:
    """The refresh-token grants tokenhub made at the IdP (the test's own
    direct requests, known by their place in the record, taken out)."""
    return [
        rec
        for i, rec in enumerate(idp.token_requests())
        if rec["grant_type"] == "refresh_token" and i not in seen["requests_by_test"]
    ]


def test_discovery_is_what_the_test_relies_on(idp):
    """The provider under test is set up as the other tests assume."""
    d = idp.discovery()
    assert d["issuer"] == idp.issuer
    assert d["token_endpoint_auth_methods_supported"] == ["client_secret_basic"]
    assert d["code_challenge_methods_supported"] == ["S256"]
    assert "RS256" in d["id_token_signing_alg_values_supported"]
    assert d.get("authorization_response_iss_parameter_supported") is True
    assert len(idp.jwks()["keys"]) == 1


def test_login_through_the_idp(idp, tokenhub, browser):
    # The person opens tokenhub's sign-in; tokenhub sends the browser to the IdP,
    # which wants a login first.
    r = browser.navigate(f"{tokenhub.url}/login")
    authorize = next(u for u in browser.hops if u.startswith(f"{idp.issuer}/authorize/"))
    assert "code_challenge_method=S256" in authorize and "nonce=" in authorize and "state=" in authorize
    assert r.status_code == 200 and r.url.startswith(f"{idp.url}/login/"), r.text[:500]
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', r.text).group(1)
    next_url = html.unescape(re.search(r'name="next" value="([^"]+)"', r.text).group(1))

    # The login form: IdP → authorize (no consent: skip_authorization) →
    # tokenhub /callback → the token page.
    hops_before = len(browser.hops)
    r = browser.navigate(
        f"{idp.url}/login/",
        method="POST",
        data={"csrfmiddlewaretoken": csrf, "next": next_url, "username": USER},
        initiator=idp.url,
    )
    callback = next(u for u in browser.hops[hops_before:] if u.startswith(f"{tokenhub.url}/callback"))
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback).query))
    assert "code" in params and "state" in params and "iss" in params, callback.split("?")[0]
    assert params["iss"] == idp.issuer
    seen["codes"].append(params["code"])
    assert r.status_code == 200, f"{r.status_code} at {r.url}:\n{r.text[:1500]}\n{tokenhub.log.read_text()[-3000:]}"
    assert r.url == f"{tokenhub.url}/", r.url
    assert "tokenhub_session" in browser.session.cookies.get_dict()

    # The lineage on the token page.
    rows = token_page(browser, tokenhub)
    assert rows["Status"] == "active"
    assert rows["Issuer"] == idp.issuer
    assert set(rows["Scopes"].split()) >= {"openid", "profile", "email"}
    assert rows["Refresh token"] == "held"
    assert rows["Last refresh"] == "never"

    # The token file: tokens the IdP issued, and they work there.
    doc = download(browser, tokenhub)
    assert {"id_token", "refresh_token", "access_token", "created_at", "expires_at", "state", "token_hash"} <= doc.keys()
    assert doc["state"] == "Valid"
    assert doc["token_hash"] == sha256(doc["id_token"])
    claims = verify_id_token(idp, doc["id_token"])
    assert claims["preferred_username"] == USER
    assert claims["sub"] == rows["Subject"]
    assert claims.get("nonce"), "the login's ID token carries the nonce tokenhub sent"
    info = userinfo(idp, doc["access_token"])
    assert info.status_code == 200 and info.json()["preferred_username"] == USER
    seen["kid_before"] = jwt.get_unverified_header(doc["id_token"])["kid"]

    # The code exchange: client_secret_basic with the credentials form-encoded.
    exchanges = [rec for rec in idp.token_requests() if rec["grant_type"] == "authorization_code"]
    assert exchanges == [
        {
            "grant_type": "authorization_code",
            "client_auth": "client_secret_basic",
            "basic_form_encoded": True,
            "status": 200,
            "error": None,
            "refresh_token_sha256": None,
        }
    ]


def test_refresh_rotates_the_refresh_token(idp, tokenhub, browser):
    before = seen["documents"][-1]
    refresh_through_tokenhub(browser, tokenhub)
    after = download(browser, tokenhub)

    assert after["refresh_token"] != before["refresh_token"], "the IdP rotates refresh tokens"
    assert after["access_token"] != before["access_token"]
    assert after["state"] == "Refreshed"

    # tokenhub presented the old refresh token once, and the IdP answered 200.
    refreshes = tokenhubs_refresh_requests(idp)
    assert [(r["refresh_token_sha256"], r["status"]) for r in refreshes] == [(sha256(before["refresh_token"]), 200)]
    assert refreshes[0]["client_auth"] == "client_secret_basic" and refreshes[0]["basic_form_encoded"]

    # The old refresh token is dead at the IdP (rotation without grace).
    seen["requests_by_test"].add(len(idp.token_requests()))
    r = requests.post(
        f"{idp.issuer}/token/",
        data={"grant_type": "refresh_token", "refresh_token": before["refresh_token"]},
        auth=idp.client_auth(),
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant", r.text

    # The new tokens work: access token at userinfo, ID token against the key set.
    info = userinfo(idp, after["access_token"])
    assert info.status_code == 200 and info.json()["preferred_username"] == USER
    claims = verify_id_token(idp, after["id_token"])
    assert claims["sub"] == verify_id_token(idp, before["id_token"])["sub"]
    assert jwt.get_unverified_header(after["id_token"])["kid"] == seen["kid_before"]

    rows = token_page(browser, tokenhub)
    assert rows["Status"] == "active"
    assert rows["Last refresh"] != "never"


def test_key_rollover(idp, tokenhub, browser):
    before = seen["documents"][-1]
    rolled = idp.rotate_key()
    assert rolled["kid"] != seen["kid_before"] and rolled["inactive_kids"] == [seen["kid_before"]]
    fetches_before = idp.jwks_fetches_by_others()

    # The next refresh brings an ID token signed with the new key, which
    # tokenhub has not seen: it must fetch the key set again and accept it.
    refresh_through_tokenhub(browser, tokenhub)
    seen["refetched_at"] = time.monotonic()
    after = download(browser, tokenhub)
    assert jwt.get_unverified_header(after["id_token"])["kid"] == rolled["kid"]
    assert idp.jwks_fetches_by_others() == fetches_before + 1, "tokenhub fetched the key set once more"
    assert verify_id_token(idp, after["id_token"])["preferred_username"] == USER
    assert after["refresh_token"] != before["refresh_token"]
    assert userinfo(idp, after["access_token"]).status_code == 200
    # The old key stays published, so ID tokens it signed still verify.
    verify_id_token(idp, before["id_token"])

    rows = token_page(browser, tokenhub)
    assert rows["Status"] == "active"

    # And the lineage goes on: one more refresh with the new key in hand.
    refresh_through_tokenhub(browser, tokenhub)
    last = download(browser, tokenhub)
    assert last["refresh_token"] != after["refresh_token"]
    assert jwt.get_unverified_header(last["id_token"])["kid"] == rolled["kid"]
    assert idp.jwks_fetches_by_others() == fetches_before + 1, "the new key was kept, not fetched again"
    assert token_page(browser, tokenhub)["Status"] == "active"

    # Every refresh tokenhub made presented a different refresh token, each
    # the one the IdP issued last, and each was accepted: no consumed token
    # was ever sent again.
    refreshes = tokenhubs_refresh_requests(idp)
    presented = [r["refresh_token_sha256"] for r in refreshes]
    assert presented == [sha256(d["refresh_token"]) for d in seen["documents"][:-1]]
    assert all(r["status"] == 200 for r in refreshes), refreshes


def test_second_rollover_within_the_refetch_limit(idp, tokenhub, browser):
    """Issue 10's case: the IdP rolls its key again before tokenhub may fetch
    the key set again (at most once per 30 s). The refresh itself succeeded at
    the IdP, which consumed the old refresh token: tokenhub must keep the new
    tokens, keep the lineage, never send the consumed token again, and verify
    the new ID token once it may fetch the key set."""
    # The previous test's refetch was moments ago; the limit must still hold.
    assert time.monotonic() - seen["refetched_at"] < 20, "this test must follow test_key_rollover at once"
    rolled = idp.rotate_key()
    fetches_before = idp.jwks_fetches_by_others()

    hops_before = len(browser.hops)
    r = browser.navigate(f"{tokenhub.url}/refresh")
    assert not any(u.startswith(idp.issuer) for u in browser.hops[hops_before:]), "tokenhub fell back to a new login"
    assert r.status_code in (200, 503), f"{r.status_code}:\n{r.text[:1500]}"
    if r.status_code == 503:
        assert r.headers.get("Retry-After")
    assert idp.jwks_fetches_by_others() == fetches_before, "the key set was fetched again within 30 s"
    assert token_page(browser, tokenhub)["Status"] == "active"

    # Meanwhile the token file is either not served yet (503, Retry-After) or
    # carries an ID token that verifies (the last verified one).
    r = browser.navigate(f"{tokenhub.url}/tokens.json")
    if r.status_code == 503:
        assert r.headers.get("Retry-After")
    else:
        assert r.status_code == 200, r.text[:500]
        seen["documents"].append(r.json())
        verify_id_token(idp, r.json()["id_token"])

    # Once the limit has passed, a refresh brings and verifies the new key.
    time.sleep(max(0.0, seen["refetched_at"] + 31 - time.monotonic()))
    refresh_through_tokenhub(browser, tokenhub)
    last = download(browser, tokenhub)
    assert jwt.get_unverified_header(last["id_token"])["kid"] == rolled["kid"]
    assert verify_id_token(idp, last["id_token"])["preferred_username"] == USER
    assert idp.jwks_fetches_by_others() == fetches_before + 1
    assert token_page(browser, tokenhub)["Status"] == "active"

    # The IdP accepted every refresh tokenhub made (with rotation and no grace
    # period, a consumed token would have been refused), each with another token.
    refreshes = tokenhubs_refresh_requests(idp)
    assert all(r["status"] == 200 for r in refreshes), refreshes
    presented = [r["refresh_token_sha256"] for r in refreshes]
    assert len(presented) == len(set(presented)) == 5, presented


def test_no_token_in_tokenhubs_log_database_or_pages(idp, tokenhub):
    assert len(seen["documents"]) >= 4, "the tests before this one ran"
    values = {idp.client_secret, tokenhub.crypt_key, *seen["codes"]}
    for doc in seen["documents"]:
        values |= {doc["id_token"], doc["access_token"], doc["refresh_token"]}
    # The signature part alone of each ID token, too (a log could cut a JWT).
    values |= {doc["id_token"].rsplit(".", 1)[1] for doc in seen["documents"]}
    files = [tokenhub.log, *tokenhub.database.parent.glob(tokenhub.database.name + "*")]
    assert tokenhub.database in files and tokenhub.log.stat().st_size > 0
    for path in files:
        content = path.read_bytes()
        for value in values:
            assert value.encode() not in content, f"a secret value is in {path.name}"
    # Nor do the token page and the /refresh page show any.
    assert len(seen["pages"]) >= 8
    for page in seen["pages"]:
        for value in values:
            assert value not in page, "a secret value is in a page"
