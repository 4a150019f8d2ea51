#!/usr/bin/env python3
"""Writes the files of the Helm chart that are made from other files:

  helm/tokenhub/values.schema.json      from helm/tokenhub/values.schema.yaml
                                        (as Zero to JupyterHub does: the YAML
                                        is authored, descriptions are dropped)
  helm/tokenhub/files/tokenhub_config.py  hub/tokenhub_config.py, byte for
                                        byte (NOTES.txt prints it)
  helm/examples/jupyterhub-values.yaml  its hub.extraConfig.tokenhub, the last
                                        entry of the file, is the same bytes

With --check nothing is written: the exit status is 1 and the stale files are
named when any differs from what would be written (tests/helm runs this).

Needs PyYAML: tests/helm/run.sh's venv has it (.venv-helm/bin/python).
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BLOCK = ROOT / "hub" / "tokenhub_config.py"
CHART = ROOT / "helm" / "tokenhub"
SCHEMA_YAML = CHART / "values.schema.yaml"
SCHEMA_JSON = CHART / "values.schema.json"
CHART_BLOCK = CHART / "files" / "tokenhub_config.py"
HUB_VALUES = ROOT / "helm" / "examples" / "jupyterhub-values.yaml"
# Everything after this line of the example is the block, indented.
BLOCK_KEY = "    tokenhub: |"
BLOCK_INDENT = " " * 6


def strip_descriptions(schema):
    """The schema without `description` keywords, which only document it
    (a property that happens to be called "description" is kept)."""
    if isinstance(schema, list):
        return [strip_descriptions(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in ("properties", "definitions", "$defs", "patternProperties"):
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        else:
            out[key] = strip_descriptions(value)
    return out


def schema_json():
    schema = yaml.safe_load(SCHEMA_YAML.read_bytes())
    return json.dumps(strip_descriptions(schema), indent=2) + "\n"


def hub_values(block):
    """The example hub values with `block` as hub.extraConfig.tokenhub."""
    text = HUB_VALUES.read_bytes().decode()
    head, sep, _ = text.partition(BLOCK_KEY + "\n")
    if not sep:
        sys.exit(f"{HUB_VALUES.relative_to(ROOT)}: no line {BLOCK_KEY!r} (the block must be the file's last entry)")
    lines = block.split("\n")
    if lines[-1] != "" or (len(lines) > 1 and lines[-2] == ""):
        # `|` keeps exactly one final newline: anything else would not round-trip.
        sys.exit(f"{BLOCK.relative_to(ROOT)} must end with exactly one newline")
    body = "".join(f"{BLOCK_INDENT}{line}\n" if line else "\n" for line in lines[:-1])
    result = head + sep + body
    parsed = yaml.safe_load(result)["hub"]["extraConfig"]["tokenhub"]
    if parsed != block:
        sys.exit("the block does not survive YAML as a literal scalar (tabs or trailing spaces?)")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if a file is stale")
    args = parser.parse_args()
    # Bytes, not read_text(): newline translation would hide a difference.
    block = BLOCK.read_bytes().decode()
    wanted = {
        SCHEMA_JSON: schema_json(),
        CHART_BLOCK: block,
        HUB_VALUES: hub_values(block),
    }
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_bytes() != text.encode()]
    for path in stale:
        name = path.relative_to(ROOT)
        if args.check:
            print(f"stale: {name} (run scripts/gen-helm.py)", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(wanted[path].encode())
            print(f"wrote {name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
