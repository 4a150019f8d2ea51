"""The hub block (hub/tokenhub_config.py) in the three places it runs:
loaded with `load_subconfig`, executed the way Zero to JupyterHub executes
`hub.extraConfig` and `jupyterhub_config.d/`, and loaded from a
`jupyterhub_config.d/` folder the way The Littlest JupyterHub does. Each
configuration is loaded and initialized by the real JupyterHub (its role
loading refuses a role defined twice, a role naming an undefined service and
unknown scopes), then the result is checked: one tokenhub service with the
expected token and URL, one role of each name, the operator's settings kept,
and users' and servers' tokens carrying tokenhub's scope.

Run: .venv/bin/python -m pytest tests/hub -q   (and with .venv-jupyterhub6)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import stat
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub import orm, roles, scopes
from jupyterhub.app import JupyterHub
from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[2]
BLOCK = ROOT / "hub" / "tokenhub_config.py"
SCOPE = "access:services!service=tokenhub"
SERVICE_URL = "http://127.0.0.1:8090"


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """The environment the block reads, and a scratch working directory (the
    hub writes nothing there with these settings, but be safe)."""
    for name in list(os.environ):
        if name.startswith("TOKENHUB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TOKENHUB_PUBLIC_URL", "https://hub.example.org/services/tokenhub")
    monkeypatch.setenv("TOKENHUB_INTERNAL_URL", "http://tokenhub.internal:8080/services/tokenhub")
    monkeypatch.setenv("TOKENHUB_HUB_CLIENT_SECRET", "hub-client-secret-" + "s" * 16)
    monkeypatch.setenv("TOKENHUB_HUB_REDIRECT_URI", "https://hub.example.org/hub/oauth_callback")
    monkeypatch.setenv("TOKENHUB_SERVICE_URL", SERVICE_URL)
    monkeypatch.setenv("TOKENHUB_ALLOW_ALL", "true")
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "ab" * 32)  # auth state is on
    monkeypatch.chdir(tmp_path)


def start_hub(config_file: Path) -> JupyterHub:
    """JupyterHub loads `config_file` with its own loader and initializes:
    database, roles, services and their tokens, the authenticator."""
    app = JupyterHub(config_file=str(config_file), db_url="sqlite://", cookie_secret=os.urandom(32))
    asyncio.run(app.initialize([]))
    return app


def named(entries, name):
    found = [e for e in entries if e["name"] == name]
    assert len(found) == 1, f"{len(found)} entries named {name}: {entries}"
    return found[0]


def server_token_scopes(app: JupyterHub, username: str) -> set[str]:
    """The scopes JupyterHub gives a server's JUPYTERHUB_API_TOKEN, resolved
    as jupyterhub.user.User.spawn does: the requested scopes, narrowed to what
    the user holds."""
    user = orm.User.find(app.db, username)
    if user is None:
        user = orm.User(name=username)
        app.db.add(user)
        app.db.commit()
        roles.assign_default_roles(app.db, user)
    requested = app.spawner_class(config=app.config).server_token_scopes
    assert requested, "server_token_scopes is set"
    requested = {s + f"={username}/" if s.endswith("!server") else s for s in requested}
    have = roles.roles_to_scopes(roles.get_roles_for(user)) | {"inherit"}
    client = app.db.query(orm.OAuthClient).filter_by(identifier="jupyterhub").one()
    resolved, _ = scopes._resolve_requested_scopes(requested, have, user, client, app.db)
    return set(resolved)


def check_common(app: JupyterHub, token: str, url: str) -> None:
    """What every placement must give."""
    service = named(app.services, "tokenhub")
    assert service["api_token"] == token and service["url"] == url
    assert orm.APIToken.find(app.db, token).service.name == "tokenhub"
    assert orm.Service.find(app.db, "tokenhub").url == url
    role = named(app.load_roles, "tokenhub")
    assert {"read:users:name", "read:users:groups", "read:servers", "read:shares"} <= set(role["scopes"])
    # tokenhub reaches no server with its own token: it writes each token
    # file with that server's own token.
    assert not any(s.startswith("access:servers") for s in role["scopes"])
    assert not any(s.startswith("access:servers") for s in orm.Role.find(app.db, "tokenhub").scopes)
    assert role["services"] == ["tokenhub"]
    assert SCOPE in orm.Role.find(app.db, "user").scopes
    assert "self" in orm.Role.find(app.db, "user").scopes
    assert [s.name for s in orm.Role.find(app.db, "tokenhub").services] == ["tokenhub"]
    assert type(app.authenticator).__name__ == "GenericOAuthenticator"
    assert app.authenticator.authorize_url == "https://hub.example.org/services/tokenhub/oauth2/authorize"
    assert app.authenticator.token_url == "http://tokenhub.internal:8080/services/tokenhub/oauth2/token"
    # A server's own token carries tokenhub's scope, besides JupyterHub's defaults.
    granted = server_token_scopes(app, "alice")
    assert SCOPE in granted
    assert {"users:activity!user", "access:servers!server=alice/"} <= granted
    # The operator API's custom scope is defined (JupyterHub checked its name).
    assert "custom:tokenhub:admin" in app.custom_scopes
    assert "custom:tokenhub:delegate" in app.custom_scopes


# --- 1. load_subconfig from jupyterhub_config.py


def test_load_subconfig(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    monkeypatch.setenv("TOKENHUB_ADMIN_USERS", "ada, bob")
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        textwrap.dedent(
            f"""
            c = get_config()
            c.JupyterHub.services.append({{"name": "other", "api_token": "{"o" * 40}"}})
            c.JupyterHub.load_roles.append({{"name": "other", "scopes": ["read:users"], "services": ["other"]}})
            load_subconfig({str(BLOCK)!r})
            """
        )
    )
    app = start_hub(config)
    check_common(app, "t" * 40, SERVICE_URL)
    # The file's own entries are kept next to the block's.
    assert named(app.services, "other")["api_token"] == "o" * 40
    named(app.load_roles, "other")
    auth = app.authenticator
    assert auth.allow_all is True
    assert auth.admin_users == {"ada", "bob"}
    assert auth.client_id == "jupyterhub" and auth.enable_auth_state and auth.enable_pkce
    assert app.config.Spawner.pre_spawn_hook.__name__ == "_tokenhub_pre_spawn_hook"


def test_managed_service_gets_command_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENHUB_SERVICE_COMMAND", '["/opt/tokenhub", "serve", "--quiet"]')
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(f"load_subconfig({str(BLOCK)!r})\n")
    app = start_hub(config)
    service = named(app.services, "tokenhub")
    assert service["command"] == ["/opt/tokenhub", "serve", "--quiet"]
    assert "api_token" not in service, "the hub makes one for a service it starts"
    assert service["environment"]["TOKENHUB_PUBLIC_URL"] == "https://hub.example.org/services/tokenhub"
    assert service["environment"]["JUPYTERHUB_CRYPT_KEY"] == "ab" * 32


# --- 2. and 3. Zero to JupyterHub: hub.extraConfig and jupyterhub_config.d

# A stand-in for Z2JH's z2jh.py: the same `get_config(key, default=None)`
# signature (a key is required: the old block's `get_config()` fails here as
# it did in the chart) over values kept in a JSON file next to it.
Z2JH_MODULE = '''
import json, os
_here = os.path.dirname(os.path.abspath(__file__))

def _values():
    with open(os.path.join(_here, "values.json")) as f:
        return json.load(f)

def get_config(key, default=None):
    value = _values()
    for level in key.split("."):
        if not isinstance(value, dict) or level not in value:
            return default
        value = value[level]
    return value

def get_secret_value(key, default="never-explicitly-set"):
    secret = _values()["_secret"]
    if key in secret:
        return secret[key]
    if default != "never-explicitly-set":
        return default
    raise Exception(f"{key} not found in either k8s Secret!")
'''

# The steps of Z2JH's jupyterhub/files/hub/jupyterhub_config.py that matter
# here, in its order and with its constructs: `get_config` rebound to the
# module's; services and roles assigned as lists and filled from
# hub.services (token from the Secret) and hub.loadRoles; hub.config sections
# applied with update(); jupyterhub_config.d files and then hub.extraConfig
# entries run with exec() in this same namespace.
Z2JH_CONFIG = '''
c = get_config()  # noqa
import glob, os, sys
configuration_directory = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, configuration_directory)
from z2jh import get_config, get_secret_value

c.JupyterHub.services = []
c.JupyterHub.load_roles = []
for key, service in get_config("hub.services", {}).items():
    service.setdefault("name", key)
    service.pop("apiToken", None)
    service["api_token"] = get_secret_value(f"hub.services.{key}.apiToken")
    c.JupyterHub.services.append(service)
for key, role in get_config("hub.loadRoles", {}).items():
    role.setdefault("name", key)
    c.JupyterHub.load_roles.append(role)
for section, cfg in get_config("hub.config", {}).items():
    if section == "JupyterHub":
        cfg.pop("services", None)
    c[section].update(cfg)

config_dir = os.path.join(configuration_directory, "jupyterhub_config.d")
if os.path.isdir(config_dir):
    for file_path in sorted(glob.glob(f"{config_dir}/*.py")):
        file_name = os.path.basename(file_path)
        with open(file_path) as f:
            file_content = f.read()
        exec(compile(source=file_content, filename=file_name, mode="exec"))

for key, config_py in sorted(get_config("hub.extraConfig", {}).items()):
    exec(config_py)
'''

Z2JH_TOKEN = "z2jh-generated-" + "9" * 32


def z2jh_hub(tmp_path: Path, values: dict, in_config_d: bool) -> JupyterHub:
    """Lays out the hub's config folder as the chart mounts it and starts the
    hub on it; the block goes into hub.extraConfig or jupyterhub_config.d."""
    sys.modules.pop("z2jh", None)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "z2jh.py").write_text(Z2JH_MODULE)
    (folder / "jupyterhub_config.py").write_text(Z2JH_CONFIG)
    if in_config_d:
        (folder / "jupyterhub_config.d").mkdir()
        (folder / "jupyterhub_config.d" / "tokenhub.py").write_text(BLOCK.read_text())
    else:
        values["hub"]["extraConfig"] = {"tokenhub": BLOCK.read_text()}
    values["_secret"] = {"hub.services.tokenhub.apiToken": Z2JH_TOKEN}
    (folder / "values.json").write_text(json.dumps(values))
    try:
        return start_hub(folder / "jupyterhub_config.py")
    finally:  # the config file put its folder on sys.path
        while str(folder) in sys.path:
            sys.path.remove(str(folder))
        sys.modules.pop("z2jh", None)


def operator_values() -> dict:
    """Values an operator writes: the tokenhub service (its URL; the chart
    generates its token), a role for it, their own user and server roles, and
    authenticator settings of their own."""
    return {
        "hub": {
            "services": {"tokenhub": {"url": "http://tokenhub.jhub.svc:8080", "display": True}},
            "loadRoles": {
                "tokenhub": {"description": "the operator's", "scopes": ["read:users:name"], "services": ["tokenhub"]},
                "user": {"scopes": ["self", "read:users:activity"]},
                "server": {"scopes": ["users:activity!user", "access:servers!server", "read:users:name!user"]},
                # Operators by group, with the custom scope the block defines.
                "tokenhub-operators": {"scopes": ["custom:tokenhub:admin", SCOPE], "groups": ["tokenhub-operators"]},
                # Delegation, with the hub's filter on the other custom scope.
                "tokenhub-delegation": {"scopes": ["custom:tokenhub:delegate!group=physics"], "groups": ["schedulers"]},
            },
            "config": {
                "JupyterHub": {"admin_access": True, "authenticator_class": "dummy"},
                "GenericOAuthenticator": {
                    "allow_all": False,
                    "allowed_users": ["alice"],
                    "admin_users": ["root-admin"],
                    "login_service": "CILogon",
                },
            },
        }
    }


def test_z2jh_extra_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENHUB_ADMIN_USERS", "not-this-one")
    app = z2jh_hub(tmp_path, operator_values(), in_config_d=False)
    check_common(app, Z2JH_TOKEN, "http://tokenhub.jhub.svc:8080")
    service = named(app.services, "tokenhub")
    assert service["display"] is True, "the operator's value is kept"
    role = named(app.load_roles, "tokenhub")
    assert role["description"] == "the operator's"
    assert named(app.load_roles, "user")["scopes"] == ["self", "read:users:activity", SCOPE]
    # JupyterHub loaded the operators' role: the custom scope it names exists.
    operators = orm.Role.find(app.db, "tokenhub-operators")
    assert set(operators.scopes) == {"custom:tokenhub:admin", SCOPE}
    assert [g.name for g in operators.groups] == ["tokenhub-operators"]
    delegation = orm.Role.find(app.db, "tokenhub-delegation")
    assert delegation.scopes == ["custom:tokenhub:delegate!group=physics"], "a filtered delegate scope loads"
    # The operator's settings win over the block's.
    auth = app.authenticator
    assert auth.allow_all is False
    assert auth.allowed_users - auth.admin_users == {"alice"}  # JupyterHub adds admins
    assert auth.admin_users == {"root-admin"}
    assert auth.login_service == "CILogon"
    # The server token asks for the operator's server role plus tokenhub's scope.
    assert list(app.config.Spawner.server_token_scopes) == [
        "users:activity!user",
        "access:servers!server",
        "read:users:name!user",
        SCOPE,
    ]
    assert "read:users:name!user" in server_token_scopes(app, "bob")


def test_z2jh_with_the_documented_example_values(tmp_path, monkeypatch):
    """helm/examples/jupyterhub-values.yaml as an operator pastes it, over
    Z2JH's own default hub.config; the hub pod's environment is its
    hub.extraEnv (a value from a Secret stands in as a literal)."""
    import yaml

    values = yaml.safe_load((ROOT / "helm" / "examples" / "jupyterhub-values.yaml").read_text())
    values["hub"]["config"] = {"JupyterHub": {"admin_access": True, "authenticator_class": "dummy"}}
    for name in ("TOKENHUB_SERVICE_URL", "TOKENHUB_ALLOW_ALL"):
        monkeypatch.delenv(name)
    for name, value in values["hub"]["extraEnv"].items():
        monkeypatch.setenv(name, value if isinstance(value, str) else "from-the-secret-" + "x" * 16)
    app = z2jh_hub(tmp_path, values, in_config_d=False)
    assert named(app.services, "tokenhub")["url"] == "http://tokenhub:8000"
    assert orm.APIToken.find(app.db, Z2JH_TOKEN).service.name == "tokenhub"
    auth = app.authenticator
    assert type(auth).__name__ == "GenericOAuthenticator"
    assert auth.token_url == "http://tokenhub:8000/services/tokenhub/oauth2/token"
    assert auth.allowed_groups == {"researchers"} and "alice" in auth.admin_users
    assert SCOPE in orm.Role.find(app.db, "user").scopes
    # The operators' role loads: the block defined the custom scope it names.
    operators = orm.Role.find(app.db, "tokenhub-operators")
    assert set(operators.scopes) == {"custom:tokenhub:admin", SCOPE}
    assert [g.name for g in operators.groups] == ["tokenhub-operators"]


def test_z2jh_config_d_with_defaults(tmp_path):
    """The chart's defaults (authenticator "dummy", no roles) and a bare
    `hub.services.tokenhub: {}`: the block fills in everything."""
    values = {"hub": {"services": {"tokenhub": {}}, "config": {"JupyterHub": {"authenticator_class": "dummy"}}}}
    app = z2jh_hub(tmp_path, values, in_config_d=True)
    check_common(app, Z2JH_TOKEN, SERVICE_URL)
    assert named(app.services, "tokenhub")["display"] is False
    assert app.authenticator.allow_all is True


def test_z2jh_without_a_service_entry(tmp_path, monkeypatch):
    """No hub.services.tokenhub: the block adds the service, with the token
    from the environment."""
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "e" * 40)
    app = z2jh_hub(tmp_path, {"hub": {}}, in_config_d=False)
    check_common(app, "e" * 40, SERVICE_URL)


def test_tljh_config_d(tmp_path, monkeypatch):
    """The Littlest JupyterHub's jupyterhub_config.py sets the authenticator's
    lists on `Authenticator` and then load_subconfig()s every file of
    jupyterhub_config.d: the block must not override those lists, and must
    complete a `user` role defined there rather than define a second one."""
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "l" * 40)
    monkeypatch.setenv("TOKENHUB_ADMIN_USERS", "not-this-one")
    folder = tmp_path / "config.d"
    folder.mkdir()
    (folder / "tokenhub.py").write_text(BLOCK.read_text())
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        textwrap.dedent(
            f"""
            from glob import glob
            c = get_config()
            c.Authenticator.admin_users = {{"tljh-admin"}}
            c.Authenticator.allowed_users = {{"tljh-user"}}
            c.JupyterHub.load_roles = [{{"name": "user", "scopes": ["self", "read:users:activity"]}}]
            for ec in sorted(glob({str(folder)!r} + "/*.py")):
                load_subconfig(ec)
            """
        )
    )
    app = start_hub(config)
    check_common(app, "l" * 40, SERVICE_URL)
    assert app.authenticator.admin_users == {"tljh-admin"}
    assert app.authenticator.allowed_users == {"tljh-user", "tljh-admin"}  # JupyterHub adds admins
    assert named(app.load_roles, "user")["scopes"] == ["self", "read:users:activity", SCOPE]


# --- The block's own rules, on a bare Config


def run_block(c: Config | None = None, **names) -> dict:
    namespace = {"__name__": "config", **names}
    if c is not None:
        namespace["c"] = c
    exec(compile(BLOCK.read_text(), str(BLOCK), "exec"), namespace)
    return namespace


def test_without_c_the_loader_get_config_is_used(monkeypatch):
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    config = Config()
    namespace = run_block(get_config=lambda: config)
    assert namespace["c"] is config
    assert [s["name"] for s in config.JupyterHub.services.to_dict()["extend"]] == ["tokenhub"]


def test_a_username_claim_other_than_tokenhubs_name_is_refused(monkeypatch):
    """The hub's user name must be tokenhub's canonical, subject-bound name:
    an operator's `email` (the upstream's, unbound) would be another name."""
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    for section in ("OAuthenticator", "GenericOAuthenticator"):
        c = Config()
        c[section].username_claim = "email"
        with pytest.raises(RuntimeError, match="TOKENHUB_USERNAME_CLAIM"):
            run_block(c)
    c = Config()
    c.GenericOAuthenticator.username_claim = "preferred_username"
    run_block(c)
    assert c.GenericOAuthenticator.username_claim == "preferred_username"


def test_operator_server_token_scopes_are_extended(monkeypatch):
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    c = Config()
    c.Spawner.server_token_scopes = ["inherit"]
    c.KubeSpawner.server_token_scopes = lambda spawner: ["users:activity!user"]
    run_block(c)
    assert c.Spawner.server_token_scopes == ["inherit", SCOPE, "access:servers!server"]
    # The server's token must reach its own server: tokenhub writes the token file with it.
    assert asyncio.run(c.KubeSpawner.server_token_scopes(None)) == ["users:activity!user", SCOPE, "access:servers!server"]


def test_missing_service_token_is_named(monkeypatch):
    with pytest.raises(RuntimeError, match="TOKENHUB_SERVICE_API_TOKEN"):
        run_block(Config())


def test_operator_pre_spawn_hook_still_runs(monkeypatch):
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    c = Config()
    c.Spawner.pre_spawn_hook = lambda spawner: None
    operator_hook = c.Spawner.pre_spawn_hook
    namespace = run_block(c)
    assert namespace["_th_operator_hook"] is operator_hook
    assert c.Spawner.pre_spawn_hook is namespace["_tokenhub_pre_spawn_hook"]


# --- The spawn hook


class SpawnAnswer(BaseHTTPRequestHandler):
    """tokenhub's spawn endpoint, answering what the test puts in `answer`."""

    answer: dict = {}
    received: list = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def spawn_endpoint(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), SpawnAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TOKENHUB_INTERNAL_URL", f"http://127.0.0.1:{server.server_port}/services/tokenhub")
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    yield SpawnAnswer
    server.shutdown()
    server.server_close()


class SimpleLocalProcessSpawner:
    """Only what the hook reads of a spawner (named like JupyterHub's, whose
    servers run as the hub's user: no file is made private)."""

    def __init__(self, home: Path):
        self.user = SimpleNamespace(name="alice")
        self.name = ""
        self.home_dir = str(home)
        self.environment = {"KEEP": "1"}
        self.args = ["--allow-root"]
        self.api_token = "server-own-token-" + "s" * 16
        self.log = logging.getLogger("test-spawner")


def test_hook_warns_when_the_login_brought_no_refresh_token(spawn_endpoint, tmp_path, caplog):
    spawn_endpoint.answer = {"env": {"CILOGON_ACCESS_TOKEN": "x"}, "token_file": ".tokens.json"}
    hook = run_block(Config())["_tokenhub_pre_spawn_hook"]
    spawner = SimpleLocalProcessSpawner(tmp_path)
    with caplog.at_level(logging.WARNING, logger="test-spawner"):
        asyncio.run(hook(spawner))
    assert spawner.environment["FABRIC_TOKEN_LOCATION"] == str(tmp_path / ".tokens.json")
    assert spawner.environment["KEEP"] == "1"
    assert spawner.args == ["--allow-root", "--ContentsManager.allow_hidden=True"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "alice's login brought no refresh token" in warning
    assert "https://hub.example.org/services/tokenhub/refresh" in warning
    assert "TOKENHUB_OIDC_AUTH_PARAMS" in warning and "prompt=consent" in warning


def test_hook_is_quiet_with_a_refresh_token(spawn_endpoint, tmp_path, caplog):
    spawn_endpoint.answer = {"env": {"CILOGON_REFRESH_TOKEN": "r" * 20}, "token_file": ".tokens.json"}
    hook = run_block(Config())["_tokenhub_pre_spawn_hook"]
    spawner = SimpleLocalProcessSpawner(tmp_path)
    with caplog.at_level(logging.WARNING, logger="test-spawner"):
        asyncio.run(hook(spawner))
    assert spawner.environment["CILOGON_REFRESH_TOKEN"] == "r" * 20
    # The server's own token goes to tokenhub, which writes the token file
    # with it (and with no credential of its own).
    assert spawn_endpoint.received[-1] == {"user": "alice", "server": "", "server_token": spawner.api_token}
    assert not caplog.records
    assert not (tmp_path / ".tokens.json").exists(), "no file for a server that runs as the hub's user"


# --- The token file made private (as root, for a real system account)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as a hub on a shared machine")


@pytest.fixture
def make_private(monkeypatch):
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    return run_block(Config())["_th_make_private"]


@pytest.fixture
def account():
    return pwd.getpwnam("nobody")


def user_dir(tmp_path: Path, account) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chown(home, account.pw_uid, account.pw_gid)
    return home


@needs_root
def test_file_is_created_private_and_owned_by_the_user(make_private, account, tmp_path):
    home = user_dir(tmp_path, account)
    make_private(account, str(home / ".tokens.json"))
    st = (home / ".tokens.json").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (account.pw_uid, account.pw_gid)


@needs_root
def test_users_existing_file_becomes_private(make_private, account, tmp_path):
    home = user_dir(tmp_path, account)
    path = home / ".tokens.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    os.chown(path, account.pw_uid, account.pw_gid)
    make_private(account, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "{}", "content kept: tokenhub rewrites it"


@needs_root
def test_a_planted_symlink_is_not_followed(make_private, account, tmp_path):
    home = user_dir(tmp_path, account)
    target = tmp_path / "roots-file"
    target.write_text("secret")
    os.chmod(target, 0o644)
    (home / ".tokens.json").symlink_to(target)
    with pytest.raises(OSError):
        make_private(account, str(home / ".tokens.json"))
    assert target.stat().st_uid == 0 and stat.S_IMODE(target.stat().st_mode) == 0o644
    # Nor a symlinked folder in the user's directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / "work").symlink_to(elsewhere)
    with pytest.raises(OSError):
        make_private(account, str(home / "work" / ".tokens.json"))
    assert not (elsewhere / ".tokens.json").exists()


@needs_root
def test_a_missing_folder_of_the_users_is_made_private(make_private, account, tmp_path):
    # The bearer-token file's folder (.tokenhub): made 0700 and the user's,
    # the file in it 0600 and the user's.
    home = user_dir(tmp_path, account)
    make_private(account, str(home / ".tokenhub" / "bt_default"))
    folder = (home / ".tokenhub").lstat()
    assert stat.S_ISDIR(folder.st_mode) and stat.S_IMODE(folder.st_mode) == 0o700
    assert (folder.st_uid, folder.st_gid) == (account.pw_uid, account.pw_gid)
    st = (home / ".tokenhub" / "bt_default").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == account.pw_uid
    # A folder missing from a directory of root's is not made.
    with pytest.raises(OSError):
        make_private(account, str(tmp_path / "nowhere" / "bt_default"))
    assert not (tmp_path / "nowhere").exists()


@needs_root
def test_a_file_of_someone_else_is_not_given_away(make_private, account, tmp_path):
    home = user_dir(tmp_path, account)
    path = home / ".tokens.json"
    path.write_text("root's")
    os.chmod(path, 0o644)  # e.g. a hard link to a file of root's
    with pytest.raises(PermissionError):
        make_private(account, str(path))
    assert path.stat().st_uid == 0 and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_server_root_of_a_system_account(monkeypatch):
    """Servers of SystemdSpawner run as the account its username_template
    names; before the spawner has created it (TLJH does so when it starts the
    server), the token file goes to that account's future home."""
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    namespace = run_block(Config())

    class SystemdSpawner:
        user = SimpleNamespace(name="alice")
        username_template = "jupyter-{USERNAME}"

        def _expand_user_properties(self, template):
            return template.replace("{USERNAME}", self.user.name)

    spawner = SystemdSpawner()
    name = namespace["_th_system_name"](spawner)
    assert name == "jupyter-alice"
    assert namespace["_th_server_root"](spawner, name, None) == "/home/jupyter-alice"
    nobody = pwd.getpwnam("nobody")
    assert namespace["_th_server_root"](spawner, "nobody", nobody) == nobody.pw_dir
    spawner.dynamic_users = True
    assert namespace["_th_system_name"](spawner) is None, "no account to own a file"


def test_running_twice_changes_nothing(monkeypatch):
    """Pasted twice (extraConfig and jupyterhub_config.d): still one service,
    one role of each name, one scope, one spawn call."""
    monkeypatch.setenv("TOKENHUB_SERVICE_API_TOKEN", "t" * 40)
    c = Config()
    run_block(c)
    scopes_before = list(c.Spawner.server_token_scopes)
    namespace = run_block(c)
    assert namespace["_th_operator_hook"] is None
    services = c.JupyterHub.services.to_dict()["extend"]
    roles_ = c.JupyterHub.load_roles.to_dict()["extend"]
    assert [s["name"] for s in services] == ["tokenhub"]
    assert sorted(r["name"] for r in roles_) == ["tokenhub", "user"]
    assert named(roles_, "user")["scopes"] == ["self", SCOPE]
    assert list(c.Spawner.server_token_scopes) == scopes_before
