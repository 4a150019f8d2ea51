"""Token fetch from a notebook's point of view, measured in one run on one
machine (see README, "Benchmark"):

  - tokenhub's GET /api/v1/tokens (hot path: no refresh needed), direct and
    through the hub's proxy, with a real server's JUPYTERHUB_API_TOKEN;
  - the same job done as the OAuthenticator docs recommend: the hub's REST
    API, GET /hub/api/users/{name} with auth_state (admin:auth_state scope);
  - the ceiling: a minimal axum handler returning a body of the same size;
    and the same handler in tokenhub's own server loop (connection limits
    and timeouts), to tell what the loop costs from what the rest does.

Prints requests/s, p50 and p99 per concurrency level, and tokenhub's
resident memory. BENCH_ONLY (say `direct,ceiling`) runs only the targets
whose names contain one of its words. Run it with scripts/bench.sh. BENCH_LOG sets tokenhub's
log filter (default `info`; `info,tokenhub::request_frame=warn` leaves the
request spans out and keeps the audit lines, to see what the spans cost).
With BENCH_PROFILE=<file>, perf records tokenhub's stacks during the load into <file>
(scripts/profile.sh turns that into a flame graph). With
BENCH_INSTRUCTIONS=1, tokenhub and the ceiling run under callgrind instead,
and it prints the instructions each executes per request (at 1 and 16
connections, BENCH_SECONDS each): a count that does not drift with the
machine's load, for comparing two builds.
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


def callgrind_wrapper(binary: Path, out_dir: Path) -> Path:
    """A script that runs `binary` under callgrind, counting nothing until
    told to (callgrind_control -i on): the stack starts it as tokenhub."""
    wrapper = out_dir / "tokenhub-under-callgrind"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'exec valgrind --quiet --tool=callgrind --instr-atstart=no --callgrind-out-file={out_dir}/callgrind.%p "{binary}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def instructions(pid: str, out_dir: Path, measure) -> int:
    """Instructions the process under callgrind `pid` executed while
    `measure()` ran."""
    subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True)
    measure()
    subprocess.run(["callgrind_control", "--instr=off", pid], check=True, capture_output=True)
    for dump in out_dir.glob(f"callgrind.{pid}*"):
        dump.unlink()
    subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
    dumps = sorted(out_dir.glob(f"callgrind.{pid}*"))
    assert dumps, f"no callgrind dump for {pid} in {out_dir}"
    total = 0
    for dump in dumps:
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def served(output: str, name: str, connections: int, seconds: int) -> int:
    """Requests answered for one row of the load generator's table."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 3 and cells[0] == name and cells[1] == str(connections):
            return round(float(cells[2]) * seconds)
    raise AssertionError(f"no row for {name} at {connections} connections in:\n{output}")


def count_instructions(stack, release, out_dir, direct, server_token, size) -> None:
    """Instructions per request, tokenhub's hot path against the ceiling,
    both under callgrind (repeatable whatever else the machine does)."""
    built = subprocess.run(
        ["cargo", "bench", "--bench", "token_fetch", "--no-run", "--message-format=json", "-q"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    artifacts = [json.loads(line) for line in built.splitlines() if line.startswith("{")]
    bench = next(a["executable"] for a in artifacts if a.get("target", {}).get("name") == "token_fetch" and a.get("executable"))
    ceiling = subprocess.Popen(
        ["valgrind", "--quiet", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_dir}/callgrind.%p",
         bench, "--serve-ceiling", str(size)],
        stdout=subprocess.PIPE, text=True,
    )
    port = ceiling.stdout.readline().strip()
    pid = subprocess.run(["pgrep", "-f", f"{release} serve"], capture_output=True, text=True).stdout.split()[0]
    seconds = int(os.environ.get("BENCH_SECONDS", "10"))
    servers = {
        "tokenhub /api/v1/tokens": (pid, {"url": direct, "auth": f"token {server_token}"}),
        "ceiling: minimal axum handler": (str(ceiling.pid), {"url": f"http://127.0.0.1:{port}/tokens"}),
    }
    print("\n| target | connections | requests | instructions per request |\n|---|---:|---:|---:|")
    try:
        for connections in (1, 16):
            for name, (server_pid, target) in servers.items():
                env = {
                    **os.environ, "BENCH_TARGETS": json.dumps([{"name": name, **target}]),
                    "BENCH_CONCURRENCY": str(connections), "BENCH_ROUNDS": "1", "BENCH_SECONDS": str(seconds),
                }
                out = {}

                def load():
                    out["stdout"] = subprocess.run([bench], env=env, capture_output=True, text=True, check=True).stdout

                total = instructions(server_pid, out_dir, load)
                requests = served(out["stdout"], name, connections, seconds)
                print(f"| {name} | {connections} | {requests} | {total / requests:,.0f} |", flush=True)
    finally:
        ceiling.kill()


def main() -> None:
    release = Path(os.environ.get("BENCH_TOKENHUB_BIN", ROOT / "target" / "release" / "tokenhub"))
    out_dir = Path(tempfile.mkdtemp(prefix="tokenhub-bench-"))
    counting = os.environ.get("BENCH_INSTRUCTIONS") == "1"
    tokenhub_port = free_port()
    stack = Stack(
        state_dir=Path(tempfile.mkdtemp(prefix="tokenhub-bench-")),
        hub_port=free_port(),
        hub_api_port=free_port(),
        proxy_api_port=free_port(),
        idp_port=free_port(),
        tokenhub_port=tokenhub_port,
        tokenhub_bin=callgrind_wrapper(release, out_dir) if counting else release,
        # The default log level: each fetch writes its audit line, as in production.
        extra_env={"TOKENHUB_LOG": os.environ.get("BENCH_LOG", "info")},
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
        if counting:
            return count_instructions(stack, release, out_dir, direct, server_token, size)
        pid = subprocess.run(["pgrep", "-f", f"{release} serve"], capture_output=True, text=True).stdout.split()[0]
        time.sleep(3)  # let tokenhub settle before reading its idle memory
        targets = [
            {"name": "tokenhub /api/v1/tokens (direct)", "url": direct, "auth": f"token {server_token}", "pid": int(pid)},
            {"name": "tokenhub /api/v1/tokens (via proxy)", "url": f"{stack.tokenhub_url}/api/v1/tokens", "auth": f"token {server_token}", "pid": int(pid)},
            {"name": "hub REST /hub/api/users/{name} + auth_state", "url": f"{stack.hub_url}/hub/api/users/bench", "auth": f"token {stack.admin_token}"},
            {"name": "ceiling: minimal axum handler", "url": "builtin"},
            # The same handler in tokenhub's server loop: what the loop costs.
            {"name": "ceiling in tokenhub's server loop", "url": "builtin-loop"},
        ]
        # BENCH_ONLY=direct,ceiling: only the targets whose names contain one of these words.
        only = [w for w in os.environ.get("BENCH_ONLY", "").split(",") if w]
        targets = [t for t in targets if not only or any(w in t["name"] for w in only)]
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
