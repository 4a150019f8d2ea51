"""The container image the chart deploys, built from the repository's
Dockerfile as it is (scripts/build-image.sh: buildah, the base image made
here from Debian's packages and this machine's Rust toolchain) and run as
the rendered Deployment runs it: its user and group, a read-only root file
system, no capabilities, no privilege escalation, the chart's environment,
/tmp as a size-limited scratch mount and /data on a volume.

What differs from the pod, and why:
  - podman runs it with host networking and TOKENHUB_BIND=127.0.0.1:<port>
    (servers started by tests listen on loopback only); the runtime is runc
    and the open-files and process limits are set, as this machine's
    cgroups require;
  - the PersistentVolumeClaim is a directory of the test's, owned by the
    pod's fsGroup as Kubernetes would make it;
  - the IdP (npm oidc-provider, idp/server.mjs) and PostgreSQL run on
    127.0.0.1; no hub takes part (the login and token fetch go through
    tokenhub's own pages, as a user's browser does).

Nothing is skipped: a machine that cannot build or run the image fails
these tests and says why.
"""

import html
import http.cookiejar
import json
import os
import re
import subprocess
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from chart_support import FIGURES, ROOT, VALUE_SETS, find, free_port, merged, render, secret_data
from test_boot import HUB_SECRET, container_env, die_with_parent

VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
USER = "container-user"


def run(*args, **kwargs):
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(list(args), **kwargs)


@pytest.fixture(scope="session")
def image():
    """The image built from the Dockerfile; its build time is printed."""
    started = time.monotonic()
    result = run(str(ROOT / "scripts" / "build-image.sh"), timeout=1800)
    if result.returncode != 0:
        pytest.fail(f"the image could not be built on this machine:\n{result.stderr[-6000:]}")
    FIGURES["image build (s, cached parts reused)"] = f"{time.monotonic() - started:.0f}"
    return result.stdout.strip().splitlines()[-1]


def inspect(image):
    (config,) = json.loads(run("podman", "image", "inspect", image, check=True).stdout)
    return config


@pytest.fixture(scope="session")
def image_root(image):
    """The image's file system, mounted read-only for inspection."""
    mounted = run("podman", "image", "mount", image)
    if mounted.returncode != 0:
        pytest.fail(f"podman image mount failed: {mounted.stderr}")
    yield Path(mounted.stdout.strip())
    run("podman", "image", "unmount", image)


def needed_libraries(binary):
    """The ELF interpreter and DT_NEEDED libraries of `binary` (readelf)."""
    dynamic = run("readelf", "--dynamic", "--program-headers", "--wide", str(binary), check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    interpreter = re.search(r"Requesting program interpreter: ([^\]]+)\]", dynamic).group(1)
    return needed, interpreter


def test_the_image_holds_the_binary_its_libraries_and_ca_certificates(image, image_root):
    files, dirs = {}, set()
    for path in image_root.rglob("*"):
        relative = "/" + str(path.relative_to(image_root))
        if path.is_dir() and not path.is_symlink():
            dirs.add(relative)
        else:
            files[relative] = path
    binary = image_root / "usr/local/bin/tokenhub"
    needed, interpreter = needed_libraries(binary)
    libraries = {p for p in files if p != "/usr/local/bin/tokenhub" and p != "/etc/ssl/certs/ca-certificates.crt"}
    # Each library the binary names, and the loader at the path the binary
    # asks for; nothing else.
    assert {Path(p).name for p in libraries} == needed | {Path(interpreter).name}, sorted(files)
    assert interpreter in libraries
    assert set(files) == libraries | {"/usr/local/bin/tokenhub", "/etc/ssl/certs/ca-certificates.crt"}
    # Debian's CA bundle, not this machine's.
    bundle = (image_root / "etc/ssl/certs/ca-certificates.crt").read_text()
    assert bundle.count("BEGIN CERTIFICATE") > 100
    # /data belongs to the unprivileged user; /tmp is writable by anyone.
    assert (image_root / "data").stat().st_uid == 65532 and (image_root / "data").stat().st_gid == 65532
    assert oct((image_root / "tmp").stat().st_mode & 0o7777) == "0o1777"
    size = int(inspect(image)["Size"])
    FIGURES["image size (MB)"] = f"{size / 1e6:.1f}"
    FIGURES["image contents"] = ", ".join(sorted(files))
    assert size < 60e6, f"the image is {size / 1e6:.0f} MB"


def test_the_image_names_its_version_and_commit(image):
    config = inspect(image)
    labels = config["Config"]["Labels"]
    commit = run("git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD").stdout.strip()
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"].removesuffix("-modified") == commit
    # The same as OCI annotations on the image's manifest (the build script's).
    annotations = config["Annotations"]
    assert annotations["org.opencontainers.image.version"] == VERSION
    assert annotations["org.opencontainers.image.revision"] == labels["org.opencontainers.image.revision"]
    assert config["Config"]["User"] == "65532:65532"
    assert config["Config"]["Entrypoint"] == ["/usr/local/bin/tokenhub"] and config["Config"]["Cmd"] == ["serve"]
    out = podman_run(image, "--version", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tokenhub {VERSION} (commit {labels['org.opencontainers.image.revision']})"


# `podman run` as this machine needs it: runc (crun fails on its cgroups),
# host networking, and limits it accepts.
PODMAN_RUN = ["podman", "--runtime", "runc", "run", "--rm", "--network", "host",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def podman_run(image, *args, **kwargs):
    return run(*PODMAN_RUN, image, *args, **kwargs)


def pod_flags(objects):
    """podman's flags for the Deployment's security settings, and the checks
    each one is later held to."""
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    security = {**pod["securityContext"], **pod["containers"][0]["securityContext"]}
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    flags = [f"--user={security['runAsUser']}:{security['runAsGroup']}", f"--group-add={security['fsGroup']}"]
    assert security["readOnlyRootFilesystem"] is True
    flags += ["--read-only", "--read-only-tmpfs=false"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    flags.append("--cap-drop=all")
    assert security["allowPrivilegeEscalation"] is False
    flags.append("--security-opt=no-new-privileges")
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}  # podman's default profile
    return flags, security


class Idp:
    """The test IdP (npm oidc-provider) on 127.0.0.1."""

    def __init__(self, workdir, client_id, client_secret, redirect_uri):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "PATH": os.environ["PATH"],
            "IDP_PORT": str(self.port),
            "IDP_STATE_DIR": str(workdir / "idp"),
            "IDP_CLIENT_ID": client_id,
            "IDP_CLIENT_SECRET": client_secret,
            "IDP_REDIRECT_URIS": redirect_uri,
            "IDP_TEST_CONTROL": "1",
            "IDP_PARENT_PID": str(os.getpid()),
        }
        self.log = open(workdir / "idp.log", "w+")
        self.process = subprocess.Popen(
            ["node", str(ROOT / "idp" / "server.mjs")], env=env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        wait_for(f"{self.url}/.well-known/openid-configuration", lambda: self.process.poll() is None, self.logs)

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stats(self):
        with urllib.request.urlopen(f"{self.url}/_test/stats", timeout=5) as r:
            return json.load(r)

    def hold_token_requests(self, seconds):
        request = urllib.request.Request(f"{self.url}/_test/token-hold?seconds={seconds}&count=1", method="POST")
        urllib.request.urlopen(request, timeout=5).close()

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


def wait_for(url, alive, logs, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive():
            pytest.fail(f"exited before {url} answered:\n{logs()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{url} did not answer within {seconds}s:\n{logs()[-4000:]}")


class Browser:
    """A cookie-keeping client that follows redirects one by one, sending
    the Fetch Metadata headers of a top-level navigation."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    def __init__(self):
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies), self._NoRedirect)

    def navigate(self, url, form=None, origin=None):
        """(status, final URL, body) of opening `url` (posting `form`)."""
        for _ in range(12):
            headers = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Accept": "text/html,*/*",
                       "Sec-Fetch-Site": "same-origin" if origin else "none"}
            data = None
            if form is not None:
                data = urllib.parse.urlencode(form).encode()
                headers["Origin"] = origin
            try:
                with self.opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=60) as r:
                    return r.status, url, r.read().decode()
            except urllib.error.HTTPError as e:
                if e.code not in (301, 302, 303, 307, 308):
                    return e.code, url, e.read().decode()
                url = urllib.parse.urljoin(url, e.headers["Location"])
                form = None
        raise AssertionError("too many redirects")


class Container:
    """The image, run as the rendered Deployment's container."""

    def __init__(self, image, objects, workdir, port, name):
        container, env = container_env(objects, HUB_SECRET)
        self.flags, self.security = pod_flags(objects)
        self.env = {**env, "TOKENHUB_BIND": f"127.0.0.1:{port}"}
        volumes = {v["name"]: v for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
        mounts = []
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                size = volume["emptyDir"]["sizeLimit"].replace("Mi", "m")
                mounts.append(f"--tmpfs={mount['mountPath']}:rw,nosuid,nodev,size={size},mode=1777")
            else:
                assert "persistentVolumeClaim" in volume
                local = workdir / mount["name"]
                if not local.exists():
                    local.mkdir()
                    # As the kubelet does for fsGroup: the group owns the volume.
                    os.chown(local, 0, self.security["fsGroup"])
                    local.chmod(0o2770)
                mounts.append(f"--volume={local}:{mount['mountPath']}")
        self.mounts = {m["mountPath"] for m in container["volumeMounts"]}
        self.name = name
        self.args = container["args"]
        self.image = image
        self.all_flags = [*self.flags, *mounts, *(f"--env={k}" for k in self.env), "--name", name]
        self.log_path = workdir / f"{name}.log"
        self.grace = find(objects, "Deployment")["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)

    def start(self):
        """Starts the container; returns the seconds until /healthz answered."""
        self.log = open(self.log_path, "a+")
        started = time.monotonic()
        # The values reach podman through its environment (--env=NAME), not
        # its command line, where any local user could read them.
        self.process = subprocess.Popen(
            [*PODMAN_RUN, *self.all_flags, self.image, *self.args],
            env={"PATH": os.environ["PATH"], **self.env}, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        wait_for(f"{self.public_base()}/healthz", lambda: self.process.poll() is None, self.logs)
        return time.monotonic() - started

    def public_base(self):
        path = urllib.parse.urlsplit(self.env["TOKENHUB_PUBLIC_URL"]).path.rstrip("/")
        return f"http://{self.env['TOKENHUB_BIND']}{path}"

    def pid(self):
        return int(run("podman", "inspect", "--format", "{{.State.Pid}}", self.name, check=True).stdout)

    def stop(self):
        """SIGTERM, as the kubelet sends it; (exit status, seconds taken)."""
        started = time.monotonic()
        run("podman", "kill", "--signal", "TERM", self.name)
        try:
            code = self.process.wait(self.grace)
        except subprocess.TimeoutExpired:
            run("podman", "kill", "--signal", "KILL", self.name)
            code = self.process.wait(30)
        return code, time.monotonic() - started

    def logs(self):
        self.log.flush()
        return self.log_path.read_text()

    def remove(self):
        run("podman", "rm", "--force", "--time", "0", self.name)
        if getattr(self, "process", None) and self.process.poll() is None:
            self.process.kill()


def login(browser, base, idp):
    """Signs in through tokenhub's /login at the IdP's form; the token page."""
    status, url, body = browser.navigate(f"{base}/login")
    assert status == 200 and url.startswith(f"{idp.url}/interaction/"), (status, url, body[:500])
    action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', body).group(1))
    status, url, body = browser.navigate(urllib.parse.urljoin(url, action), form={"login": USER}, origin=idp.url)
    assert status == 200 and url == f"{base}/", (status, url, body[:1500])
    return body


def token_document(browser, base):
    status, _, body = browser.navigate(f"{base}/tokens.json")
    assert status == 200, body[:500]
    return json.loads(body)


@pytest.fixture(params=["sqlite", "postgresql"])
def deployment(request, chart, tmp_path, postgres):
    """The rendered objects of the example values (SQLite on a volume, or
    PostgreSQL), pointed at this test's IdP and port, and the IdP."""
    port = free_port()
    public = f"http://127.0.0.1:{port}/services/tokenhub"
    values = merged(VALUE_SETS["sqlite-example"], {
        "publicUrl": public,
        "oidc": {"issuer": "http://127.0.0.1:0", "clientSecret": "container-test-secret"},
        "jupyterhub": {"apiUrl": f"http://127.0.0.1:{free_port()}/hub/api", "proxyUrl": f"http://127.0.0.1:{free_port()}"},
    })
    if request.param == "postgresql":
        values = merged(values, {"database": {"url": postgres}})
    idp = Idp(tmp_path, values["oidc"]["clientId"], values["oidc"]["clientSecret"], f"{public}/callback")
    values = merged(values, {"oidc": {"issuer": idp.url}})
    objects, _ = render(chart, values)
    yield request.param, objects, port, idp
    idp.stop()


def test_the_image_runs_as_the_chart_runs_it(image, deployment, tmp_path):
    backend, objects, port, idp = deployment
    container = Container(image, objects, tmp_path, port, f"tokenhub-test-{backend}-{os.getpid()}")
    browser = Browser()
    try:
        seconds = container.start()
        FIGURES[f"image start to /healthz, {backend} (ms)"] = f"{seconds * 1000:.0f}"
        base = container.public_base()
        assert {"/tmp"} | ({"/data"} if backend == "sqlite" else set()) == container.mounts

        # The process is the image's user, with no capability and no way to
        # gain privileges, on a read-only root.
        status = Path(f"/proc/{container.pid()}/status").read_text()
        assert re.search(r"^Uid:\s+65532\s+65532\s+65532\s+65532$", status, re.M), status
        assert re.search(r"^Gid:\s+65532\s", status, re.M) and re.search(r"^Groups:.*\b65532\b", status, re.M)
        for cap in ("CapEff", "CapPrm", "CapBnd"):
            assert re.search(rf"^{cap}:\s+0+$", status, re.M), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        mounts = Path(f"/proc/{container.pid()}/mounts").read_text().splitlines()
        root = next(line.split() for line in mounts if line.split()[1] == "/")
        assert "ro" in root[3].split(","), root

        # A login through the container, and the tokens it keeps.
        page = login(browser, base, idp)
        assert f"Tokens of {USER}" in page
        first = token_document(browser, base)
        assert first["state"] == "Valid" and first["refresh_token"] and first["access_token"]
        if backend == "sqlite":
            assert (tmp_path / "data" / "tokenhub.sqlite").is_file()

        # SIGTERM while a refresh waits at the IdP: tokenhub finishes it,
        # stores the new refresh token, then exits, within the grace period.
        idp.hold_token_requests(3)
        answer = {}
        refresh = threading.Thread(target=lambda: answer.update(zip(("status", "url", "body"), browser.navigate(f"{base}/refresh"))))
        refresh.start()
        deadline = time.monotonic() + 20
        while idp.stats().get("token_held", 0) < 1:
            assert time.monotonic() < deadline, "the refresh did not reach the IdP"
            time.sleep(0.05)
        code, took = container.stop()
        refresh.join(30)
        assert code == 0 and took < container.grace, (code, took, container.logs()[-3000:])
        FIGURES[f"SIGTERM to exit with a refresh in flight, {backend} (s)"] = f"{took:.1f}"
        assert answer["status"] == 200 and "Your tokens were renewed" in answer["body"], answer.get("body", "")[:1500]

        # Started again on the same volume (or database): the same lineage,
        # holding the refresh token the IdP issued last, which works.
        container.remove()
        container.start()
        second = token_document(browser, base)
        assert second["state"] == "Refreshed" and second["refresh_token"] != first["refresh_token"]
        status, _, body = browser.navigate(f"{base}/refresh")
        assert status == 200 and "Your tokens were renewed" in body, body[:1500]
        third = token_document(browser, base)
        assert third["refresh_token"] != second["refresh_token"]
        assert idp.stats()["refresh_token"] == 2
        code, _ = container.stop()
        assert code == 0
    finally:
        container.remove()
        logs = container.log_path.read_text() if container.log_path.exists() else ""

    # Logs on stdout, in the chart's format (JSON lines), and no secret in them.
    lines = [line for line in logs.splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), logs[-3000:]
    messages = [json.loads(line).get("fields", {}).get("message") for line in lines]
    assert messages.count("tokenhub listening") == 2, messages
    secrets = [*secret_data(find(objects, "Secret")).values(), *HUB_SECRET["hub"].values()]
    for doc in (first, second, third):
        secrets += [doc["access_token"], doc["refresh_token"], doc["id_token"]]
    for value in secrets:
        assert value not in logs

