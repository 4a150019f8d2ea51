# JupyterHub configuration for running tokenhub on one machine: the demo
# (scripts/demo.sh) and the end-to-end tests. Everything on 127.0.0.1, users'
# servers as local processes. The tokenhub part is hub/tokenhub_config.py,
# the same block that goes into Zero to JupyterHub's hub.extraConfig.
#
#   HUB_STATE_DIR   hub database, cookie secret and users' home directories
#   HUB_PORT        the proxy's public port (default 8000)
#   HUB_API_PORT    the hub's own port (default 8081)
#   HUB_PROXY_API_PORT  the proxy's API port (default 8001)
#   HUB_TEST_ADMIN_TOKEN  (tests only) an admin service token
#   HUB_SPAWNER     "local": servers run as the users' own system accounts
#                   (LocalProcessSpawner; the hub runs as root), as on a
#                   shared machine; default: all as the hub's user, homes
#                   under the state folder (SimpleLocalProcessSpawner)
#   HUB_SERVER_PYTHON  (with "local") a Python the users may run, when the
#                   hub's own is not reachable for them; it gets the hub's
#                   packages through PYTHONPATH (HUB_SERVER_PYTHONPATH, when
#                   those too live where users cannot enter)
import os
import sysconfig

c = get_config()  # noqa: F821

here = os.path.dirname(os.path.abspath(__file__))
state = os.path.abspath(os.environ.get("HUB_STATE_DIR", os.path.join(here, ".demo", "hub")))
os.makedirs(state, exist_ok=True)
port = int(os.environ.get("HUB_PORT", "8000"))

c.JupyterHub.bind_url = f"http://127.0.0.1:{port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(os.environ.get("HUB_API_PORT", "8081"))
c.JupyterHub.db_url = f"sqlite:///{os.path.join(state, 'jupyterhub.sqlite')}"
c.JupyterHub.cookie_secret_file = os.path.join(state, "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = os.path.join(state, "jupyterhub.pid")
c.ConfigurableHTTPProxy.command = [os.path.join(here, "hub", "node_modules", ".bin", "configurable-http-proxy")]
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ.get('HUB_PROXY_API_PORT', '8001')}"
c.ConfigurableHTTPProxy.pid_file = os.path.join(state, "proxy.pid")

# Users' servers run as local processes in their own directories under the
# state folder; as root, Jupyter needs --allow-root.
if os.environ.get("HUB_SPAWNER") == "local":
    c.JupyterHub.spawner_class = "localprocess"
    if os.environ.get("HUB_SERVER_PYTHON"):
        c.Spawner.cmd = [os.environ["HUB_SERVER_PYTHON"], "-m", "jupyterhub.singleuser"]
        c.Spawner.environment = {"PYTHONPATH": os.environ.get("HUB_SERVER_PYTHONPATH") or sysconfig.get_paths()["purelib"]}
else:
    c.JupyterHub.spawner_class = "simple"
    c.SimpleLocalProcessSpawner.home_dir_template = os.path.join(state, "home", "{username}")
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
if os.geteuid() == 0:
    c.Spawner.args = ["--allow-root"]
c.JupyterHub.shutdown_on_logout = False
# Several servers per user (tokenhub writes the token file into each).
c.JupyterHub.allow_named_servers = True

# The end-to-end tests inspect servers (their pids) through an admin service.
if os.environ.get("HUB_TEST_ADMIN_TOKEN"):
    c.JupyterHub.services.append({"name": "e2e-admin", "api_token": os.environ["HUB_TEST_ADMIN_TOKEN"]})
    c.JupyterHub.load_roles.append(
        {
            "name": "e2e-admin",
            # `tokens` and the tokenhub scope: to create users' personal tokens in the tests.
            "scopes": [
                "admin:users",
                "admin:servers",
                "admin:server_state",
                "tokens",
                "access:services!service=tokenhub",
                "shares",  # to share servers in the tests
            ],
            "services": ["e2e-admin"],
        }
    )

# (tests only) a second OAuth client of the hub, so the tests can obtain a
# token the hub issued for a user to a client other than tokenhub.
if os.environ.get("HUB_TEST_OAUTH_CLIENT_SECRET"):
    c.JupyterHub.services.append(
        {
            "name": "e2e-other-client",
            "api_token": os.environ["HUB_TEST_OAUTH_CLIENT_SECRET"],
            "oauth_client_id": "service-e2e-other-client",
            "oauth_redirect_uri": os.environ["HUB_TEST_OAUTH_CLIENT_REDIRECT"],
            "oauth_no_confirm": True,
        }
    )
    # Users may sign in to it (the hub block adds tokenhub's scope to this role).
    c.JupyterHub.load_roles.append({"name": "user", "scopes": ["self", "access:services!service=e2e-other-client"]})

# tokenhub operators who are not hub admins: members of the IdP's group
# "tokenhub-operators" (the test IdP puts operator* users there), with the
# custom scope the tokenhub block defines.
c.JupyterHub.load_roles.append(
    {
        "name": "tokenhub-operators",
        "scopes": ["custom:tokenhub:admin", "access:services!service=tokenhub"],
        "groups": ["tokenhub-operators"],
    }
)

load_subconfig(os.path.join(here, "hub", "tokenhub_config.py"))  # noqa: F821
