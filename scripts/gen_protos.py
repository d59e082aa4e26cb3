"""Generate the fieldlens.v1 protobuf/gRPC Python code from protos/, or check it for drift."""

from __future__ import annotations

import argparse
import filecmp
import logging
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE_DIR = Path("fieldlens") / "v1"
OUT_ROOT = REPO_ROOT / "services"
_GENERATED_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "__init__.py")
_INIT_TEXT = '"""Generated protobuf and gRPC code for fieldlens.v1 (make proto; do not edit)."""\n'


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Return the .proto files of fieldlens.v1, sorted so generation is deterministic."""
    return sorted((proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path = OUT_ROOT, proto_root: Path = PROTO_ROOT) -> Path:
    """Run protoc for every fieldlens.v1 proto into out_root; return the package directory."""
    # Imported here so that merely importing this module (e.g. from a test) does not load
    # protoc's native extension.
    from grpc_tools import protoc

    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_PACKAGE_DIR}")
    include = _grpc_tools_include()
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(proto_root)) for p in protos),
    ]
    package_dir = out_root / PROTO_PACKAGE_DIR
    _remove_generated(package_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    (package_dir / "__init__.py").write_text(_INIT_TEXT)
    logger.info("generated %d protos into %s", len(protos), package_dir)
    return package_dir


def drift(generated_dir: Path = OUT_ROOT / PROTO_PACKAGE_DIR) -> list[str]:
    """Regenerate into a temporary directory and list the files that differ from generated_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return _compare(fresh, generated_dir)


def _remove_generated(package_dir: Path) -> None:
    # Output of a .proto that has since been deleted or renamed would otherwise linger and
    # stay importable.
    if not package_dir.is_dir():
        return
    for pattern in _GENERATED_PATTERNS:
        for path in package_dir.glob(pattern):
            path.unlink()
    shutil.rmtree(package_dir / "__pycache__", ignore_errors=True)


def _compare(expected: Path, actual: Path) -> list[str]:
    if not actual.is_dir():
        return [f"{actual} is missing"]
    expected_names = {p.name for p in expected.iterdir() if p.is_file()}
    actual_names = {p.name for p in actual.iterdir() if p.is_file() and p.suffix != ".pyc"}
    problems = [f"missing: {name}" for name in sorted(expected_names - actual_names)]
    problems += [f"stale: {name}" for name in sorted(actual_names - expected_names)]
    for name in sorted(expected_names & actual_names):
        if not filecmp.cmp(expected / name, actual / name, shallow=False):
            problems.append(f"differs: {name}")
    return problems


def _grpc_tools_include() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail when the generated code differs from protos/"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.check:
        generate()
        return 0
    problems = drift()
    for problem in problems:
        logger.error("proto drift: %s", problem)
    if problems:
        logger.error("run `make proto` to regenerate services/fieldlens/v1")
        return 1
    logger.info("generated code matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
