"""Token fetch from a notebook's point of view, measured in one run on one
machine (see README, "Benchmark"):

  - tokenhub's GET /api/v1/tokens (hot path: no refresh needed), direct and
    through the hub's proxy, with a real server's JUPYTERHUB_API_TOKEN;
  - the same job done as the OAuthenticator docs recommend: the hub's REST
    API, GET /hub/api/users/{name} with auth_state (admin:auth_state scope);
  - the ceiling: a minimal axum handler returning a body of the same size.

Prints requests/s, p50 and p99 per concurrency level, and tokenhub's
resident memory. Run it with scripts/bench.sh. With BENCH_PROFILE=<file>,
perf records tokenhub's stacks during the load into <file>
(scripts/profile.sh turns that into a flame graph).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hub"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from conftest import CHROMIUM, CHROMIUM_ARGS, Hub, log_in_and_spawn  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402
from stack import Stack, free_port  # noqa: E402


def main() -> None:
    release = Path(os.environ.get("BENCH_TOKENHUB_BIN", ROOT / "target" / "release" / "tokenhub"))
    tokenhub_port = free_port()
    stack = Stack(
        state_dir=Path(tempfile.mkdtemp(prefix="tokenhub-bench-")),
        hub_port=free_port(),
        hub_api_port=free_port(),
        proxy_api_port=free_port(),
        idp_port=free_port(),
        tokenhub_port=tokenhub_port,
        tokenhub_bin=release,
        extra_env={"TOKENHUB_LOG": "warn"},
    )
    stack.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            log_in_and_spawn(browser.new_page(), stack, "bench")
            browser.close()
        hub = Hub(stack)
        server_token = hub.server_env("bench")["JUPYTERHUB_API_TOKEN"]
        direct = f"http://127.0.0.1:{tokenhub_port}/services/tokenhub/api/v1/tokens"
        with urllib.request.urlopen(urllib.request.Request(direct, headers={"Authorization": f"token {server_token}"})) as r:
            size = len(r.read())
        pid = subprocess.run(["pgrep", "-f", f"{release} serve"], capture_output=True, text=True).stdout.split()[0]
        time.sleep(3)  # let tokenhub settle before reading its idle memory
        targets = [
            {"name": "tokenhub /api/v1/tokens (direct)", "url": direct, "auth": f"token {server_token}", "pid": int(pid)},
            {"name": "tokenhub /api/v1/tokens (via proxy)", "url": f"{stack.tokenhub_url}/api/v1/tokens", "auth": f"token {server_token}", "pid": int(pid)},
            {"name": "hub REST /hub/api/users/{name} + auth_state", "url": f"{stack.hub_url}/hub/api/users/bench", "auth": f"token {stack.admin_token}"},
            {"name": "ceiling: minimal axum handler", "url": "builtin"},
        ]
        print(f"token document: {size} bytes; tokenhub pid {pid}", flush=True)
        env = {
            **os.environ,
            "BENCH_TARGETS": json.dumps(targets),
            "BENCH_CEILING_BYTES": str(size),
            "TOKENHUB_PID": pid,
        }
        profile = os.environ.get("BENCH_PROFILE")
        recorder = None
        if profile:
            # perf samples tokenhub for the whole load (software clock: no
            # hardware counters needed), with DWARF call stacks.
            recorder = subprocess.Popen(
                ["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf,16384", "-p", pid, "-o", profile]
            )
        try:
            subprocess.run(["cargo", "bench", "--bench", "token_fetch", "-q"], cwd=ROOT, env=env, check=True)
        finally:
            if recorder:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(60)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
