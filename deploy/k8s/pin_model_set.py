"""Pin the Kubernetes base to the shipped model set (deploy/models/manifest.json).

Rewrites, in base/kustomization.yaml, the fieldlens-model-set ConfigMap's versions and the
fieldlens-models image tag; `--check` only reports drift (exit 1). `make deploy-pin-model-set`
runs it after `make train` has exported a new model set.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE.parents[1] / "deploy" / "models" / "manifest.json"
KUSTOMIZATION = HERE / "base" / "kustomization.yaml"

_PATTERNS = {
    "model_set_version": [
        re.compile(r"(- MODEL_SET_VERSION=)(\S+)"),
        re.compile(r"(- name: fieldlens-models\n\s+newTag: )(\S+)"),
    ],
    "embedding_version": [re.compile(r"(- EMBEDDING_VERSION=)(\S+)")],
}


def pinned(text: str) -> dict[str, list[str]]:
    """The values the kustomization pins, per manifest key."""
    return {
        key: [m.group(2) for p in patterns for m in p.finditer(text)]
        for key, patterns in _PATTERNS.items()
    }


def pin(text: str, manifest: dict[str, str]) -> str:
    for key, patterns in _PATTERNS.items():
        for pattern in patterns:
            text, count = pattern.subn(lambda m, v=manifest[key]: m.group(1) + v, text)
            if count != 1:
                raise SystemExit(f"{KUSTOMIZATION}: expected one match of {pattern.pattern!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, change nothing")
    args = parser.parse_args(argv)
    manifest = json.loads(MANIFEST.read_text())
    text = KUSTOMIZATION.read_text()
    wanted = pin(text, manifest)
    if wanted == text:
        print(f"model set {manifest['model_set_version']} pinned")
        return 0
    if args.check:
        print(
            f"{KUSTOMIZATION} pins {pinned(text)}, the model set is "
            f"{manifest['model_set_version']}; run `make deploy-pin-model-set`"
        )
        return 1
    KUSTOMIZATION.write_text(wanted)
    print(f"pinned model set {manifest['model_set_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
