"""Login through the stock GenericOAuthenticator, tokens injected at spawn,
fresh tokens after a new login, and users kept apart."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import jwt
from conftest import jwt_payload, log_in_and_spawn, remember, tokenhub_tokens, wait_for_file
from fabrictestbed.external_api.credmgr_client import CredmgrClient


def check_server(stack, hub, user: str) -> tuple[dict, dict, dict]:
    """The server's environment, tokenhub's current tokens and the token file
    agree; returns (env, tokens, document)."""
    env = hub.server_env(user)
    current = tokenhub_tokens(stack, env["JUPYTERHUB_API_TOKEN"])
    remember(current["refresh_token"], current["access_token"], current["id_token"], env["JUPYTERHUB_API_TOKEN"])
    assert current["user"] == user
    assert env["CILOGON_REFRESH_TOKEN"] == current["refresh_token"]
    assert env["TOKENHUB_URL"] == stack.tokenhub_url
    path = env["FABRIC_TOKEN_LOCATION"]
    assert os.path.isabs(path) and path.endswith("/.tokens.json"), path
    assert f"/home/{user}/" in path, path
    document = wait_for_file(path, lambda d: d.get("refresh_token") == current["refresh_token"])
    return env, current, document


def test_login_spawn_puts_tokens_in_env_and_file(stack, browser, hub):
    context = browser.new_context()
    page = context.new_page()
    log_in_and_spawn(page, stack, "alice")
    env, current, document = check_server(stack, hub, "alice")

    # The ID token is valid: signed by the IdP, for tokenhub, about alice.
    keys = jwt.PyJWKClient(f"{stack.idp_url}/jwks")
    claims = jwt.decode(
        document["id_token"],
        keys.get_signing_key_from_jwt(document["id_token"]).key,
        algorithms=["RS256"],
        audience="tokenhub",
        issuer=stack.idp_url,
    )
    assert claims["sub"] == "alice"
    assert document["id_token"] == current["id_token"]
    assert document["access_token"] == current["access_token"]

    # FABlib's own code parses the timestamps.
    created = datetime.strptime(document["created_at"], CredmgrClient.TIME_FORMAT)
    expires = datetime.strptime(document["expires_at"], CredmgrClient.TIME_FORMAT)
    now = datetime.now(timezone.utc)
    assert abs((created - now).total_seconds()) < 600
    assert expires > now
    assert int(expires.timestamp()) == claims["exp"]
    for key in ("state", "token_hash", "comment", "created_from"):
        assert document[key], key
    from fabrictestbed.fabric_manager_v2 import FabricManagerV2

    manager = FabricManagerV2(
        credmgr_host="127.0.0.1:9",
        orchestrator_host="127.0.0.1:9",
        token_location=env["FABRIC_TOKEN_LOCATION"],
        auto_refresh=False,
    )
    assert manager.get_refresh_token() == current["refresh_token"]
    assert manager.get_id_token() == current["id_token"]
    assert manager.id_token_expires_at() == expires
    context.close()


def test_new_login_and_respawn_bring_the_new_lineage(stack, browser, hub):
    context = browser.new_context()
    page = context.new_page()
    log_in_and_spawn(page, stack, "carol")
    _, first, _ = check_server(stack, hub, "carol")

    hub.stop_server("carol")
    page.goto(f"{stack.hub_url}/hub/logout")
    # Sign in again (the IdP session is alive: no form) and spawn again.
    log_in_and_spawn(page, stack, "carol")
    env, second, document = check_server(stack, hub, "carol")
    assert second["version"] == first["version"] + 1
    assert second["refresh_token"] != first["refresh_token"]
    assert env["CILOGON_REFRESH_TOKEN"] == second["refresh_token"]
    assert document["refresh_token"] == second["refresh_token"], "the old file was replaced"
    assert jwt_payload(document["id_token"])["sub"] == "carol"
    context.close()


def test_two_users_never_see_each_others_tokens(stack, browser, hub):
    contexts = [browser.new_context(), browser.new_context()]
    for context, user in zip(contexts, ("dave", "erin")):
        log_in_and_spawn(context.new_page(), stack, user)
    dave_env, dave, dave_doc = check_server(stack, hub, "dave")
    erin_env, erin, erin_doc = check_server(stack, hub, "erin")
    assert dave["refresh_token"] != erin["refresh_token"]
    assert dave_env["FABRIC_TOKEN_LOCATION"] != erin_env["FABRIC_TOKEN_LOCATION"]
    assert dave_env["CILOGON_REFRESH_TOKEN"] not in erin_env.values()
    assert erin_env["CILOGON_REFRESH_TOKEN"] not in dave_env.values()
    assert jwt_payload(dave_doc["id_token"])["sub"] == "dave"
    assert jwt_payload(erin_doc["id_token"])["sub"] == "erin"
    # Each server's own token reads only its own user's tokens.
    assert tokenhub_tokens(stack, erin_env["JUPYTERHUB_API_TOKEN"])["user"] == "erin"
    assert tokenhub_tokens(stack, dave_env["JUPYTERHUB_API_TOKEN"])["user"] == "dave"
    for context in contexts:
        context.close()
