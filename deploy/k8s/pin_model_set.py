"""Pin the Kubernetes manifests to the shipped model set (deploy/models/manifest.json).

Rewrites the fieldlens-model-set ConfigMap's versions and the fieldlens-models image tag in
base/kustomization.yaml, the models image tag the publish Job (jobs/publish-model-set)
defaults to, and the tag the image-build and kind steps of deploy/k8s/README.md use;
`--check` only reports drift (exit 1). `make deploy-pin-model-set` runs it after `make train`
has exported a new model set.
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
PUBLISH_JOB_KUSTOMIZATION = HERE / "jobs" / "publish-model-set" / "kustomization.yaml"
README = HERE / "README.md"

_MODELS_IMAGE_TAG = re.compile(r"(- name: fieldlens-models\n\s+newTag: )(\S+)")
# file -> manifest key -> (pattern, how many matches the file must have: None is "at least one")
_PATTERNS: dict[Path, dict[str, list[tuple[re.Pattern[str], int | None]]]] = {
    KUSTOMIZATION: {
        "model_set_version": [
            (re.compile(r"(- MODEL_SET_VERSION=)(\S+)"), 1),
            (_MODELS_IMAGE_TAG, 1),
        ],
        "embedding_version": [(re.compile(r"(- EMBEDDING_VERSION=)(\S+)"), 1)],
    },
    PUBLISH_JOB_KUSTOMIZATION: {"model_set_version": [(_MODELS_IMAGE_TAG, 1)]},
    README: {"model_set_version": [(re.compile(r"(\bfieldlens-models:)(ms-[0-9a-f]+)"), None)]},
}


def pinned(path: Path, text: str) -> dict[str, list[str]]:
    """The values a file pins, per manifest key."""
    return {
        key: [m.group(2) for p, _ in patterns for m in p.finditer(text)]
        for key, patterns in _PATTERNS[path].items()
    }


def pin(path: Path, text: str, manifest: dict[str, str]) -> str:
    for key, patterns in _PATTERNS[path].items():
        for pattern, expected in patterns:
            text, count = pattern.subn(lambda m, v=manifest[key]: m.group(1) + v, text)
            if (count == 0) if expected is None else (count != expected):
                raise SystemExit(
                    f"{path}: expected {expected or 'some'} match(es) of {pattern.pattern!r}, "
                    f"found {count}"
                )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, change nothing")
    args = parser.parse_args(argv)
    manifest = json.loads(MANIFEST.read_text())
    version = manifest["model_set_version"]
    drift = 0
    for path in _PATTERNS:
        text = path.read_text()
        wanted = pin(path, text, manifest)
        if wanted == text:
            continue
        if args.check:
            print(
                f"{path} pins {pinned(path, text)}, the model set is {version}; "
                "run `make deploy-pin-model-set`"
            )
            drift = 1
            continue
        path.write_text(wanted)
        print(f"{path}: pinned model set {version}")
    if not drift:
        print(f"model set {version} pinned")
    return drift


if __name__ == "__main__":
    sys.exit(main())
