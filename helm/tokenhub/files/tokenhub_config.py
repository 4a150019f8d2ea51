# tokenhub for JupyterHub: one self-contained block of hub configuration.
#
# Runs unchanged in three places: loaded from jupyterhub_config.py with
# `load_subconfig(...)`, pasted into Zero to JupyterHub's `hub.extraConfig`,
# and dropped into a `jupyterhub_config.d/` folder (Z2JH and The Littlest
# JupyterHub load those). It adds to what the operator configured and never
# replaces it: an existing `tokenhub` service entry or role is completed, and
# an authenticator setting is set only where the operator has not set it.
# Settings come from the hub's environment, so the same code serves every
# deployment:
#
#   TOKENHUB_PUBLIC_URL         tokenhub as browsers reach it, through the proxy
#                               (e.g. https://hub.example.org/services/tokenhub)
#   TOKENHUB_INTERNAL_URL       tokenhub as the hub reaches it (default: public URL)
#   TOKENHUB_HUB_CLIENT_ID      the hub's OAuth client id at tokenhub
#   TOKENHUB_HUB_CLIENT_SECRET  its secret (tokenhub is given the same value)
#   TOKENHUB_HUB_REDIRECT_URI   the hub's OAuth callback (…/hub/oauth_callback)
#   TOKENHUB_SERVICE_URL        where the proxy forwards /services/tokenhub/
#                               (unless the service entry has a url already)
#   TOKENHUB_SERVICE_COMMAND    run tokenhub as a hub-managed service with this
#                               command (JSON list or a path); every TOKENHUB_*
#                               variable and JUPYTERHUB_CRYPT_KEY are passed on
#   TOKENHUB_SERVICE_API_TOKEN  tokenhub's hub API token, when it runs on its own
#                               (unless the service entry has one, as in Z2JH)
#   TOKENHUB_SERVER_ROOT        a server's root directory, `{username}` expanded
#                               (default: the spawner's notebook_dir or home)
#   TOKENHUB_ALLOW_ALL          "true": every user the IdP signs in may log in
#   TOKENHUB_ALLOWED_USERS, TOKENHUB_ALLOWED_GROUPS, TOKENHUB_ADMIN_USERS,
#   TOKENHUB_ADMIN_GROUPS       comma-separated lists
import json as _th_json
import os as _th_os
import pwd as _th_pwd
import stat as _th_stat
import sys as _th_sys

from jupyterhub.roles import get_default_roles as _th_default_roles
from jupyterhub.scopes import scope_definitions as _th_scope_definitions
from jupyterhub.utils import maybe_future as _th_maybe_future
from tornado.httpclient import AsyncHTTPClient as _ThHTTPClient
from tornado.httpclient import HTTPClientError as _ThHTTPClientError
from tornado.httpclient import HTTPRequest as _ThHTTPRequest
from traitlets.config import LazyConfigValue as _ThLazy

# JupyterHub's loader and Z2JH both leave the configuration as `c` in this
# namespace. Z2JH's `get_config` is another function (it takes a key), so it is
# called only where `c` is missing. An empty Config is falsy: test the name.
if "c" not in globals():
    c = get_config()  # noqa: F821 (provided by JupyterHub's config loader)

_th_name = "tokenhub"  # the service name: the proxy path /services/tokenhub/ and the scope below
# tokenhub accepts a hub token only if it carries this scope (as JupyterHub's
# own HubAuth does): it keeps tokens the user gave to other services away.
_th_scope = f"access:services!service={_th_name}"

_th_env = _th_os.environ
_th_public = _th_env["TOKENHUB_PUBLIC_URL"].rstrip("/")
_th_internal = _th_env.get("TOKENHUB_INTERNAL_URL", _th_public).rstrip("/")
_th_client_id = _th_env.get("TOKENHUB_HUB_CLIENT_ID", "jupyterhub")
_th_client_secret = _th_env["TOKENHUB_HUB_CLIENT_SECRET"]


def _th_list(name):
    return {v.strip() for v in _th_env.get(name, "").split(",") if v.strip()}


def _th_enclosing_configs():
    """The configurations of the files that load_subconfig()ed this one
    (JupyterHub's jupyterhub_config.py, TLJH's). The block sees a fresh `c`
    there, merged into theirs only after it ran, so it looks into theirs to
    find what the operator set. Found on the call stack: traitlets'
    `load_subconfig` frame holds the loader of the enclosing file; without
    one (Z2JH, or another loader) the list is empty."""
    from traitlets.config.loader import PyFileConfigLoader

    found, frame = [], _th_sys._getframe(1)
    while frame is not None:
        loader = frame.f_locals.get("self") if frame.f_code.co_name == "load_subconfig" else None
        if isinstance(loader, PyFileConfigLoader) and loader.config is not c:
            found.append(loader.config)
        frame = frame.f_back
    return found


# Innermost first: this file's own configuration, then the enclosing files'.
_th_configs = [c, *_th_enclosing_configs()]


def _th_set_where(section, key):
    """The innermost configuration that sets `section.key`, or None."""
    return next((cfg for cfg in _th_configs if f"{section}.{key}" in cfg), None)


def _th_entries(section, key):
    """The dicts already configured in the list `section.key`, in every
    configuration. A list appended to but never assigned is a traitlets lazy
    value; its entries are read without turning it into a list, so that
    JupyterHub still merges it with lists set in other files."""
    entries = []
    for cfg in _th_configs:
        value = cfg[section][key] if f"{section}.{key}" in cfg else []
        if isinstance(value, _ThLazy):
            lazy = value.to_dict()
            value = [*lazy.get("prepend", []), *(obj for _, obj in lazy.get("inserts", [])), *lazy.get("extend", [])]
        entries += [entry for entry in value if isinstance(entry, dict)]
    return entries


def _th_named(key, name):
    """The entry called `name` in `JupyterHub.key` (services, load_roles),
    changed in place where the operator put it, or added (empty but for its
    name) if there is none: a second entry of that name would clash."""
    for entry in _th_entries("JupyterHub", key):
        if entry.get("name") == name:
            return entry
    entry = {"name": name}
    c.JupyterHub[key].append(entry)
    return entry


def _th_add_scopes(role, scopes):
    """Adds scopes to a role; a role given without scopes keeps JupyterHub's
    default ones for its name (JupyterHub merges partial default roles)."""
    defaults = {r["name"]: r.get("scopes", []) for r in _th_default_roles()}
    current = list(role.get("scopes", defaults.get(role["name"], [])))
    role["scopes"] = current + [s for s in scopes if s not in current]


# --- Login: the stock GenericOAuthenticator, with tokenhub as its provider.
# Set unconditionally: it is the point of the block, and Z2JH's default is "dummy".
c.JupyterHub.authenticator_class = "generic-oauth"


def _th_default(name, value):
    """Sets a GenericOAuthenticator setting unless the operator set it, for
    this class or a parent class (more specific sections win in traitlets, so
    setting ours would silently override theirs)."""
    sections = ("Authenticator", "OAuthenticator", "GenericOAuthenticator")
    if not any(_th_set_where(section, name) for section in sections):
        c.GenericOAuthenticator[name] = value


_th_default("login_service", _th_env.get("TOKENHUB_LOGIN_SERVICE", "your identity provider"))
_th_default("client_id", _th_client_id)
_th_default("client_secret", _th_client_secret)
_th_default("oauth_callback_url", _th_env["TOKENHUB_HUB_REDIRECT_URI"])
_th_default("authorize_url", f"{_th_public}/oauth2/authorize")
_th_default("token_url", f"{_th_internal}/oauth2/token")
_th_default("userdata_url", f"{_th_internal}/oauth2/userinfo")
_th_default("scope", ["openid", "profile", "email", "groups"])
_th_default("username_claim", "preferred_username")
# The hub's user name must be the one tokenhub keys tokens by: the canonical
# name, bound to one IdP subject, which tokenhub's userinfo gives as
# preferred_username (and username, sub). Another claim (say the upstream
# email) would hand one person's tokens to whoever holds that other name.
for _th_section in ("Authenticator", "OAuthenticator", "GenericOAuthenticator"):
    _th_cfg = _th_set_where(_th_section, "username_claim")
    if _th_cfg is not None and _th_cfg[_th_section].username_claim not in ("preferred_username", "username", "sub"):
        raise RuntimeError(
            "tokenhub: the hub's username_claim must be preferred_username (tokenhub's canonical user name); "
            "choose the IdP claim in tokenhub instead (TOKENHUB_USERNAME_CLAIM)"
        )
_th_default("enable_pkce", True)
_th_default("basic_auth", True)
_th_default("enable_auth_state", True)
_th_default("manage_groups", True)
_th_default("auth_state_groups_key", "oauth_user.groups")
if "TOKENHUB_ALLOW_ALL" in _th_env:  # else JupyterHub's default (False), or the operator's
    _th_default("allow_all", _th_env["TOKENHUB_ALLOW_ALL"].lower() == "true")
for _th_setting, _th_variable in (
    ("allowed_users", "TOKENHUB_ALLOWED_USERS"),
    ("allowed_groups", "TOKENHUB_ALLOWED_GROUPS"),
    ("admin_users", "TOKENHUB_ADMIN_USERS"),
    ("admin_groups", "TOKENHUB_ADMIN_GROUPS"),
):
    if _th_list(_th_variable):
        _th_default(_th_setting, _th_list(_th_variable))

# --- tokenhub as a service behind the hub's proxy. Z2JH turns
# `hub.services.tokenhub` into an entry with the API token it generated: that
# entry is completed, never doubled.
_th_service = _th_named("services", _th_name)
_th_service.setdefault("display", False)
if not _th_service.get("url"):
    if "TOKENHUB_SERVICE_URL" not in _th_env:
        raise RuntimeError("tokenhub: set TOKENHUB_SERVICE_URL (or the url of the tokenhub service entry)")
    _th_service["url"] = _th_env["TOKENHUB_SERVICE_URL"]
_th_command = _th_env.get("TOKENHUB_SERVICE_COMMAND")
if _th_command and "command" not in _th_service:
    _th_service["command"] = _th_json.loads(_th_command) if _th_command.startswith("[") else [_th_command, "serve"]
    _th_service.setdefault(
        "environment", {k: v for k, v in _th_env.items() if k.startswith("TOKENHUB_") or k == "JUPYTERHUB_CRYPT_KEY"}
    )
if "command" not in _th_service and not _th_service.get("api_token"):
    # A service the hub does not start needs a token to call the hub's API.
    if not _th_env.get("TOKENHUB_SERVICE_API_TOKEN"):
        raise RuntimeError(
            "tokenhub: set TOKENHUB_SERVICE_API_TOKEN, TOKENHUB_SERVICE_COMMAND "
            "or the api_token of the tokenhub service entry"
        )
    _th_service["api_token"] = _th_env["TOKENHUB_SERVICE_API_TOKEN"]

# --- Roles. tokenhub's own, merged into a role of that name the operator
# defined: read:users:name (a user's name and admin flag, for the operator's
# view), read:users:groups (a user's hub groups: the operator's rules for
# narrower tokens go by them), read:servers (which servers run, and where: tokenhub writes token
# files into ready ones). No access:servers: tokenhub writes a server's token
# file with that server's own token, which the spawn hook hands over, so no
# credential reaching other servers is ever shown to a server (its owner
# sees every header that reaches it).
# read:shares (JupyterHub 5's sharing, where the hub has it): a server shared
# with other people gets no tokens, since they run code in it.
_th_role = _th_named("load_roles", _th_name)
_th_role.setdefault("description", "tokenhub: find users' servers (token files are written with each server's own token)")
_th_add_scopes(
    _th_role,
    ["read:users:name", "read:users:groups", "read:servers", *(["read:shares"] if "read:shares" in _th_scope_definitions else [])],
)
_th_role["services"] = sorted({*_th_role.get("services", []), _th_name})
# Users hold the scope that lets their tokens reach tokenhub…
_th_add_scopes(_th_named("load_roles", "user"), [_th_scope])
# tokenhub's operator API (/api/v1/admin/lineages) takes hub admins and tokens
# with the first custom scope; grant it, with the scope above, in a role of
# yours. The second lets a hub service's token fetch users' narrower tokens
# (delegation, within TOKENHUB_DELEGATION's cap); the hub's filters say for
# whom: custom:tokenhub:delegate!group=physics in the service's role.
# (A lazy update: merged with custom scopes defined anywhere else.)
c.JupyterHub.custom_scopes.update(
    {
        f"custom:{_th_name}:admin": {"description": "See and revoke every user's tokens in tokenhub's operator view."},
        f"custom:{_th_name}:delegate": {
            "description": "Fetch users' narrower tokens from tokenhub for them (within the operator's cap)."
        },
    }
)


# …and the servers' own JUPYTERHUB_API_TOKEN asks for it (JupyterHub narrows
# the request to what the user holds), with access:servers!server: tokenhub
# writes the token file with that token, so it must reach its own server.
# Where the operator chose the scopes, ours are added to theirs; otherwise
# the request is the `server` role's scopes (JupyterHub's default request, or
# the operator's `server` role) plus ours.
_th_server_scopes = [_th_scope, "access:servers!server"]


def _th_with_scope(requested):
    if callable(requested):

        async def server_token_scopes(spawner):
            return _th_with_scope(await _th_maybe_future(requested(spawner)))

        return server_token_scopes
    return [*requested, *(s for s in _th_server_scopes if s not in requested)]


_th_sections = {
    name
    for cfg in _th_configs
    for name, section in cfg.items()
    if isinstance(section, dict) and "server_token_scopes" in section
}
for _th_section in _th_sections:
    _th_requested = _th_set_where(_th_section, "server_token_scopes")[_th_section].server_token_scopes
    c[_th_section].server_token_scopes = _th_with_scope(_th_requested)
if "Spawner" not in _th_sections:
    _th_server_role = {"name": "server"}
    for _th_entry in _th_entries("JupyterHub", "load_roles"):
        if _th_entry.get("name") == "server":
            _th_server_role = dict(_th_entry)
    _th_add_scopes(_th_server_role, _th_server_scopes)
    c.Spawner.server_token_scopes = _th_server_role["scopes"]


# --- The spawn hook: tokens into the server's environment, the token file's
# place, and (on shared machines) the file made the user's alone.
def _th_system_name(spawner):
    """The local account the server runs as, when the spawner runs servers as
    the users' own accounts; None otherwise (containers, SimpleLocalProcess)."""
    kinds = {cls.__name__ for cls in type(spawner).__mro__}
    if "SimpleLocalProcessSpawner" in kinds:
        return None  # runs every server as the hub's own user
    if "LocalProcessSpawner" in kinds:
        return spawner.user.name
    if "UserCreatingSpawner" in kinds:  # The Littlest JupyterHub: jupyter-<name>
        from tljh.normalize import generate_system_username

        return generate_system_username(f"jupyter-{spawner.user.name}")
    if "SystemdSpawner" in kinds and not getattr(spawner, "dynamic_users", False):
        return spawner._expand_user_properties(spawner.username_template)
    return None


def _th_server_root(spawner, system_name, account):
    """The server's root directory, where the token file is written."""
    name = spawner.user.name
    template = _th_env.get("TOKENHUB_SERVER_ROOT") or getattr(spawner, "notebook_dir", "")
    home = getattr(spawner, "home_dir", None)  # SimpleLocalProcessSpawner
    if not home and account is not None:
        home = account.pw_dir  # the user's own account
    elif not home and system_name:
        # An account the spawner creates when it starts the server (TLJH):
        # useradd's default home.
        home = _th_os.path.join("/home", system_name)
    elif not home:
        try:
            home = _th_pwd.getpwnam(name).pw_dir
        except KeyError:
            home = "/home/jovyan"  # the Jupyter Docker Stacks' home (KubeSpawner)
    if template:
        root = template.replace("{username}", name)
        return root.replace("~", home, 1) if root.startswith("~") else root
    return home


def _th_make_private(account, path):
    """Creates a token file before the server starts, mode 0600 and owned by
    the user (and its missing folders in the user's own, 0700); an existing
    one of theirs is made 0600. The server later writes
    it in place and keeps that mode, where a file it creates gets its umask
    (0644: readable by every user of the machine). The hub acts as root in a
    directory the user controls, so no symlink the user could plant is
    followed (only those in root's own directories are), and an existing file
    is never given away (only a file created here is chowned)."""
    o = _th_os
    fd = o.open("/", o.O_RDONLY | o.O_DIRECTORY | o.O_CLOEXEC)
    try:
        *folders, name = [part for part in path.split("/") if part]
        for folder in folders:
            st = o.fstat(fd)
            roots_own = st.st_uid == 0 and not st.st_mode & 0o022
            flags = o.O_RDONLY | o.O_DIRECTORY | o.O_CLOEXEC | (0 if roots_own else o.O_NOFOLLOW)
            try:
                folder_fd = o.open(folder, flags, dir_fd=fd)
            except FileNotFoundError:
                if roots_own:
                    raise
                # A folder of the user's that is missing (tokenhub's own
                # .tokenhub): made private, and given to the user.
                o.mkdir(folder, 0o700, dir_fd=fd)
                folder_fd = o.open(folder, flags | o.O_NOFOLLOW, dir_fd=fd)
                o.fchown(folder_fd, account.pw_uid, account.pw_gid)
            fd, parent = folder_fd, fd
            o.close(parent)
        try:
            file = o.open(name, o.O_WRONLY | o.O_CREAT | o.O_EXCL | o.O_NOFOLLOW | o.O_CLOEXEC, 0o600, dir_fd=fd)
            o.fchown(file, account.pw_uid, account.pw_gid)
        except FileExistsError:
            file = o.open(name, o.O_RDONLY | o.O_NOFOLLOW | o.O_NONBLOCK | o.O_CLOEXEC, dir_fd=fd)
            st = o.fstat(file)
            if not _th_stat.S_ISREG(st.st_mode) or st.st_uid != account.pw_uid:
                o.close(file)
                raise PermissionError("it is not a regular file of the user's") from None
        try:
            o.fchmod(file, 0o600)
        finally:
            o.close(file)
    finally:
        o.close(fd)


_th_hook_set = _th_set_where("Spawner", "pre_spawn_hook")
_th_operator_hook = _th_hook_set.Spawner.pre_spawn_hook if _th_hook_set is not None else None
if getattr(_th_operator_hook, "__name__", "") == "_tokenhub_pre_spawn_hook":
    _th_operator_hook = None  # the block ran before (pasted twice): one spawn call is enough


async def _tokenhub_pre_spawn_hook(spawner):
    """Put the user's current tokens in the server's environment; tokenhub
    writes the token file once the server is ready."""
    if _th_operator_hook is not None:
        await _th_maybe_future(_th_operator_hook(spawner))
    user = spawner.user.name
    request = _ThHTTPRequest(
        f"{_th_internal}/api/v1/hub/spawn",
        method="POST",
        headers={"Content-Type": "application/json"},
        # The server's own token: tokenhub writes the token file with it, so
        # nothing but what the server already holds is ever presented to it.
        body=_th_json.dumps({"user": user, "server": spawner.name or "", "server_token": spawner.api_token}),
        auth_username=_th_client_id,
        auth_password=_th_client_secret,
        request_timeout=20,
    )
    env = {"TOKENHUB_URL": _th_public}
    files = []
    try:
        response = await _ThHTTPClient().fetch(request)
        answer = _th_json.loads(response.body)
        env.update(answer["env"])
        token_file = answer["token_file"]
        # Files of narrower tokens tokenhub keeps fresh (BEARER_TOKEN_FILE's).
        files = answer.get("files", [])
        if answer.get("withheld"):
            spawner.log.warning(
                "tokenhub: %s's server %r is shared with other people, so it gets no tokens "
                "(no CILOGON_REFRESH_TOKEN, a note instead of the token file) until its shares are removed",
                user,
                spawner.name or "",
            )
        elif not answer["env"].get("CILOGON_REFRESH_TOKEN"):
            spawner.log.warning(
                "tokenhub: %s's login brought no refresh token, so their notebooks cannot refresh tokens; "
                "they can sign in again at %s/refresh. If this repeats, the identity provider grants "
                "offline access only when asked (e.g. prompt=consent or access_type=offline: "
                "tokenhub's TOKENHUB_OIDC_AUTH_PARAMS, and offline_access in TOKENHUB_OIDC_SCOPES)",
                user,
                _th_public,
            )
    except _ThHTTPClientError as e:
        if e.code != 404:
            raise RuntimeError(f"tokenhub could not provide tokens for {user} (HTTP {e.code})") from None
        # No tokens for this user (signed in before tokenhub): spawn without them.
        spawner.log.warning("tokenhub holds no tokens for %s; they can renew at %s/refresh", user, _th_public)
        token_file = ".tokens.json"
    system_name = _th_system_name(spawner)
    try:
        account = _th_pwd.getpwnam(system_name) if system_name else None
    except KeyError:
        account = None  # not created yet (TLJH creates it when the server starts)
    root = _th_server_root(spawner, system_name, account)
    path = _th_os.path.join(root, token_file)
    env["FABRIC_TOKEN_LOCATION"] = path
    private = [path]
    for file in files:
        file_path = _th_os.path.join(root, file["path"])
        private.append(file_path)
        if file.get("env"):
            env[file["env"]] = file_path
    if account is not None and _th_os.geteuid() == 0:
        for each in private:
            try:
                _th_make_private(account, each)
            except OSError as e:  # the server starts anyway; the file gets its umask
                spawner.log.warning("tokenhub could not make %s private to %s: %s", each, account.pw_name, e.strerror or e)
    # A new dict: spawners must not share (and leak) one environment mapping.
    spawner.environment = {**spawner.environment, **env}
    # Jupyter's Contents API refuses dotfiles unless allowed; tokenhub writes
    # `.tokens.json` (and `.tokenhub/…`) through it, so allow them (nothing
    # else changes).
    hidden = "--ContentsManager.allow_hidden=True"
    paths = [token_file, *(file["path"] for file in files)]
    if any(part.startswith(".") for p in paths for part in p.split("/")) and hidden not in spawner.args:
        spawner.args = [*spawner.args, hidden]


c.Spawner.pre_spawn_hook = _tokenhub_pre_spawn_hook
