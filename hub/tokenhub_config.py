# tokenhub for JupyterHub: one self-contained block of hub configuration.
#
# Works as a file loaded from jupyterhub_config.py (`load_subconfig(...)`) and
# pasted unchanged into Zero to JupyterHub's `hub.extraConfig`. Settings come
# from the hub's environment, so the same code serves every deployment:
#
#   TOKENHUB_PUBLIC_URL         tokenhub as browsers reach it, through the proxy
#                               (e.g. https://hub.example.org/services/tokenhub)
#   TOKENHUB_INTERNAL_URL       tokenhub as the hub reaches it (default: public URL)
#   TOKENHUB_HUB_CLIENT_ID      the hub's OAuth client id at tokenhub
#   TOKENHUB_HUB_CLIENT_SECRET  its secret (tokenhub is given the same value)
#   TOKENHUB_HUB_REDIRECT_URI   the hub's OAuth callback (…/hub/oauth_callback)
#   TOKENHUB_SERVICE_URL        where the proxy forwards /services/tokenhub/
#   TOKENHUB_SERVICE_COMMAND    run tokenhub as a hub-managed service with this
#                               command (JSON list or a path); every TOKENHUB_*
#                               variable and JUPYTERHUB_CRYPT_KEY are passed on
#   TOKENHUB_SERVICE_API_TOKEN  tokenhub's hub API token, when it runs on its own
#   TOKENHUB_SERVER_ROOT        a server's root directory, `{username}` expanded
#                               (default: the spawner's notebook_dir or home)
#   TOKENHUB_ALLOW_ALL          "true": every user the IdP signs in may log in
#   TOKENHUB_ALLOWED_USERS, TOKENHUB_ALLOWED_GROUPS, TOKENHUB_ADMIN_USERS,
#   TOKENHUB_ADMIN_GROUPS       comma-separated lists
import json as _th_json
import os as _th_os
import pwd as _th_pwd

from tornado.httpclient import AsyncHTTPClient as _ThHTTPClient
from tornado.httpclient import HTTPClientError as _ThHTTPClientError
from tornado.httpclient import HTTPRequest as _ThHTTPRequest

c = get_config()  # noqa: F821 (provided by JupyterHub's config loader)

_th_env = _th_os.environ
_th_public = _th_env["TOKENHUB_PUBLIC_URL"].rstrip("/")
_th_internal = _th_env.get("TOKENHUB_INTERNAL_URL", _th_public).rstrip("/")
_th_client_id = _th_env.get("TOKENHUB_HUB_CLIENT_ID", "jupyterhub")
_th_client_secret = _th_env["TOKENHUB_HUB_CLIENT_SECRET"]


def _th_list(name):
    return {v.strip() for v in _th_env.get(name, "").split(",") if v.strip()}


# --- Login: the stock GenericOAuthenticator, with tokenhub as its provider.
c.JupyterHub.authenticator_class = "generic-oauth"
c.GenericOAuthenticator.login_service = _th_env.get("TOKENHUB_LOGIN_SERVICE", "your identity provider")
c.GenericOAuthenticator.client_id = _th_client_id
c.GenericOAuthenticator.client_secret = _th_client_secret
c.GenericOAuthenticator.oauth_callback_url = _th_env["TOKENHUB_HUB_REDIRECT_URI"]
c.GenericOAuthenticator.authorize_url = f"{_th_public}/oauth2/authorize"
c.GenericOAuthenticator.token_url = f"{_th_internal}/oauth2/token"
c.GenericOAuthenticator.userdata_url = f"{_th_internal}/oauth2/userinfo"
c.GenericOAuthenticator.scope = ["openid", "profile", "email", "groups"]
c.GenericOAuthenticator.username_claim = "preferred_username"
c.GenericOAuthenticator.enable_pkce = True
c.GenericOAuthenticator.basic_auth = True
c.GenericOAuthenticator.enable_auth_state = True
c.GenericOAuthenticator.manage_groups = True
c.GenericOAuthenticator.auth_state_groups_key = "oauth_user.groups"
c.GenericOAuthenticator.allow_all = _th_env.get("TOKENHUB_ALLOW_ALL", "false").lower() == "true"
if _th_list("TOKENHUB_ALLOWED_USERS"):
    c.GenericOAuthenticator.allowed_users = _th_list("TOKENHUB_ALLOWED_USERS")
if _th_list("TOKENHUB_ALLOWED_GROUPS"):
    c.GenericOAuthenticator.allowed_groups = _th_list("TOKENHUB_ALLOWED_GROUPS")
if _th_list("TOKENHUB_ADMIN_USERS"):
    c.GenericOAuthenticator.admin_users = _th_list("TOKENHUB_ADMIN_USERS")
if _th_list("TOKENHUB_ADMIN_GROUPS"):
    c.GenericOAuthenticator.admin_groups = _th_list("TOKENHUB_ADMIN_GROUPS")

# --- tokenhub as a service behind the hub's proxy, with only the scopes it
# needs: read a user's servers, and reach them to write the token file.
_th_service = {"name": "tokenhub", "url": _th_env["TOKENHUB_SERVICE_URL"], "display": False}
_th_command = _th_env.get("TOKENHUB_SERVICE_COMMAND")
if _th_command:
    _th_service["command"] = _th_json.loads(_th_command) if _th_command.startswith("[") else [_th_command, "serve"]
    _th_service["environment"] = {
        k: v for k, v in _th_env.items() if k.startswith("TOKENHUB_") or k == "JUPYTERHUB_CRYPT_KEY"
    }
else:
    _th_service["api_token"] = _th_env["TOKENHUB_SERVICE_API_TOKEN"]
c.JupyterHub.services.append(_th_service)
c.JupyterHub.load_roles.append(
    {
        "name": "tokenhub",
        "description": "tokenhub: find users' servers and write their token files",
        "scopes": ["read:users:name", "read:servers", "access:servers"],
        "services": ["tokenhub"],
    }
)


def _th_server_root(spawner):
    """The server's root directory, where the token file is written."""
    name = spawner.user.name
    template = _th_env.get("TOKENHUB_SERVER_ROOT") or getattr(spawner, "notebook_dir", "")
    if template:
        root = template.replace("{username}", name)
        if root.startswith("~"):
            root = root.replace("~", getattr(spawner, "home_dir", None) or _th_pwd.getpwnam(name).pw_dir, 1)
        return root
    home = getattr(spawner, "home_dir", None)  # SimpleLocalProcessSpawner
    if home:
        return home
    try:
        return _th_pwd.getpwnam(name).pw_dir  # LocalProcessSpawner
    except KeyError:
        return "/home/jovyan"  # the Jupyter Docker Stacks' home (KubeSpawner)


async def _tokenhub_pre_spawn_hook(spawner):
    """Put the user's current tokens in the server's environment; tokenhub
    writes the token file once the server is ready."""
    request = _ThHTTPRequest(
        f"{_th_internal}/api/v1/hub/spawn",
        method="POST",
        headers={"Content-Type": "application/json"},
        body=_th_json.dumps({"user": spawner.user.name, "server": spawner.name or ""}),
        auth_username=_th_client_id,
        auth_password=_th_client_secret,
        request_timeout=20,
    )
    env = {"TOKENHUB_URL": _th_public}
    try:
        response = await _ThHTTPClient().fetch(request)
        answer = _th_json.loads(response.body)
        env.update(answer["env"])
        token_file = answer["token_file"]
    except _ThHTTPClientError as e:
        if e.code != 404:
            raise RuntimeError(f"tokenhub could not provide tokens for {spawner.user.name} (HTTP {e.code})") from None
        # No tokens for this user (signed in before tokenhub): spawn without them.
        spawner.log.warning("tokenhub holds no tokens for %s; they can renew at %s/refresh", spawner.user.name, _th_public)
        token_file = ".tokens.json"
    env["FABRIC_TOKEN_LOCATION"] = _th_os.path.join(_th_server_root(spawner), token_file)
    # A new dict: spawners must not share (and leak) one environment mapping.
    spawner.environment = {**spawner.environment, **env}
    # Jupyter's Contents API refuses dotfiles unless allowed; tokenhub writes
    # `.tokens.json` through it, so allow them (nothing else changes).
    hidden = "--ContentsManager.allow_hidden=True"
    if any(part.startswith(".") for part in token_file.split("/")) and hidden not in spawner.args:
        spawner.args = [*spawner.args, hidden]


c.Spawner.pre_spawn_hook = _tokenhub_pre_spawn_hook
