"""On a shared machine the token file is the user's alone: with
LocalProcessSpawner (servers run as the users' own system accounts, the hub as
root) the hub block creates the file 0600 and owned by the user before the
server starts, and it stays so after tokenhub rewrote it through the server's
Contents API on a refresh.

A stack of its own (the session stack runs servers as the hub's user) and a
system user made for the test with useradd, removed afterwards."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from pathlib import Path

import pytest
from conftest import Hub, log_in_and_spawn, start_stack, tokenhub_call, tokenhub_tokens, wait_for_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the hub must run as root to start servers as users")


@pytest.fixture(scope="module")
def system_user():
    """A system account with its home in a temporary folder others may enter."""
    name = f"thfile{secrets.randbelow(10**6)}"
    homes = Path(tempfile.mkdtemp(prefix="tokenhub-homes-"))
    homes.chmod(0o755)
    home = homes / name
    subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)
        shutil.rmtree(homes, ignore_errors=True)


def _runs_singleuser(python: str, pythonpath: str, account) -> bool:
    try:
        probe = subprocess.run(
            [python, "-c", "import jupyterhub.singleuser"],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            env={"PYTHONPATH": pythonpath},
            cwd=account.pw_dir,
            capture_output=True,
        )
    except OSError:  # not even executable for the user
        return False
    return probe.returncode == 0


def server_python(account, scratch: Path) -> tuple[str, str]:
    """A Python the user may run with the hub's packages, and the PYTHONPATH
    that gives them: the hub's own, or the system's of the same version (the
    venv's interpreter may live in a folder only root can enter). When the
    packages themselves are out of the user's reach (a checkout under
    /root), a hard-linked copy in `scratch` serves: same files, no copying."""
    purelib = sysconfig.get_paths()["purelib"]
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"]
    for python in candidates:
        if _runs_singleuser(python, purelib, account):
            return python, purelib
    copy = scratch / "site-packages"
    if subprocess.run(["cp", "-al", purelib, str(copy)], capture_output=True).returncode != 0:
        shutil.copytree(purelib, copy, symlinks=True)
    for python in candidates:
        if _runs_singleuser(python, str(copy), account):
            return python, str(copy)
    pytest.fail(f"no Python the user can run jupyterhub.singleuser with: {candidates}")


@pytest.fixture(scope="module")
def local_stack(system_user):
    scratch = Path(tempfile.mkdtemp(prefix="tokenhub-python-"))
    scratch.chmod(0o755)
    python, pythonpath = server_python(system_user, scratch)
    state = Path(tempfile.mkdtemp(prefix="tokenhub-e2e-local-"))
    s = start_stack(
        state,
        extra_env={"HUB_SPAWNER": "local", "HUB_SERVER_PYTHON": python, "HUB_SERVER_PYTHONPATH": pythonpath},
    )
    yield s
    s.stop()
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)


def assert_private(path: str, account) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), path
    assert stat.S_IMODE(st.st_mode) == 0o600, f"{path} has mode {stat.S_IMODE(st.st_mode):o}"
    assert (st.st_uid, st.st_gid) == (account.pw_uid, account.pw_gid), "owned by the user"


def test_token_file_is_private_after_spawn_and_after_a_refresh(local_stack, browser, system_user):
    hub = Hub(local_stack)
    user = system_user.pw_name
    context = browser.new_context()
    log_in_and_spawn(context.new_page(), local_stack, user)

    pid = hub.server_pid(user)
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert int(status["Uid"].split()[0]) == system_user.pw_uid, "the server runs as the user's own account"
    env = hub.server_env(user)
    path = env["FABRIC_TOKEN_LOCATION"]
    assert path == os.path.join(system_user.pw_dir, ".tokens.json")

    # The server's own token carries the scope tokenhub asks for (hub block).
    token = env["JUPYTERHUB_API_TOKEN"]
    whoami = urllib.request.Request(f"{local_stack.hub_url}/hub/api/user", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(whoami, timeout=30) as r:
        assert "access:services!service=tokenhub" in json.loads(r.read())["scopes"]

    # tokenhub has written the file through the server once it was ready.
    first = tokenhub_tokens(local_stack, token)
    wait_for_file(path, lambda d: d["refresh_token"] == first["refresh_token"] == env["CILOGON_REFRESH_TOKEN"])
    assert_private(path, system_user)

    # A refresh rewrites it in place: still the user's alone.
    status, refreshed, _ = tokenhub_call(local_stack, token, "POST", "/api/v1/tokens/refresh")
    assert status == 200, refreshed
    assert refreshed["refresh_token"] != first["refresh_token"]
    wait_for_file(path, lambda d: d["refresh_token"] == refreshed["refresh_token"])
    assert_private(path, system_user)
    # Jupyter's backup copy of the old content is gone after the write.
    assert not os.path.exists(os.path.join(system_user.pw_dir, ".~.tokens.json"))

    # The control: a file the same server creates through the same API gets
    # its umask, readable by every user of the machine (what the file made
    # before the server started prevents).
    request = urllib.request.Request(
        f"{local_stack.hub_url}/user/{user}/api/contents/control.json",
        method="PUT",
        data=json.dumps({"type": "file", "format": "text", "content": "{}"}).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status in (200, 201)
    control = os.stat(os.path.join(system_user.pw_dir, "control.json"))
    assert control.st_uid == system_user.pw_uid
    assert stat.S_IMODE(control.st_mode) & 0o044, "the server's own files are readable by others"
    context.close()
    hub.stop_server(user)

    logs = local_stack.hub_log.read_text()
    seen = [first["refresh_token"], first["access_token"], refreshed["refresh_token"], refreshed["access_token"], token]
    assert not [t[:6] for t in seen if t in logs], "no token value in the hub's log"
