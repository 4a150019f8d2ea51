import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import helm_python as helm
import pytest

from chart_support import CHART_DIR, FIGURES, free_port


@pytest.fixture(scope="session")
def chart():
    """The chart, loaded once by Helm's Go SDK."""
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def postgres_bin(name):
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    for bin_dir in reversed(versions):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return shutil.which(name) or pytest.fail(f"{name} not found: apt-get install postgresql")


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 (as the Rust tests start one)."""
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="tokenhub-helm-pg-"))
    data = base / "data"
    if as_postgres:
        shutil.chown(base, "postgres")
    subprocess.run(
        [*as_postgres, postgres_bin("initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    # The shell loop stops the server once this test process is gone, even
    # if it is killed (the server runs as another user: it watches /proc).
    script = (
        f'"$0" -D "$1" -p {port} -k "$2" -c listen_addresses=127.0.0.1 -c fsync=off & pg=$!; '
        f"while [ -d /proc/{os.getpid()} ] && kill -0 $pg 2>/dev/null; do sleep 1; done; kill $pg"
    )
    server = subprocess.Popen(
        [*as_postgres, "sh", "-c", script, postgres_bin("postgres"), str(data), str(base)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "PostgreSQL did not start"
            time.sleep(0.2)
    yield f"postgres://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_postgres, postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], stdout=subprocess.DEVNULL, check=False)
    server.wait(20)
    shutil.rmtree(base, ignore_errors=True)



def pytest_terminal_summary(terminalreporter):
    """What the tests measured (FIGURES), printed after the results."""
    if FIGURES:
        terminalreporter.section("measured")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
