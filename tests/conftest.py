"""What the tests need from the machine: the data, kubectl, promtool, prometheus (a fixture each).

A test that needs a missing one skips under a bare `pytest`, the reason saying what is missing
and how to get it. `make test` sets FIELDLENS_REQUIRE_ALL=1: the run then fails before the first
test starts (so before any server is launched), listing every prerequisite of the selected tests
that is missing, instead of passing with part of the suite skipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fieldlens.common.settings import DATA_DIR_ENV, SettingsError, data_dir_from_env

REQUIRE_ALL_ENV = "FIELDLENS_REQUIRE_ALL"
_DEPLOY_TOOLS = "`make deploy-tools` installs it (Debian's prometheus package)"


@dataclass(frozen=True)
class _Prerequisite:
    # Where it is; None when missing.
    find: Callable[[], Path | None]
    # What is missing and how to get it.
    missing: Callable[[], str]


def _find_data() -> Path | None:
    path = data_dir_from_env()
    return path if (path / "classes.csv").is_file() else None


def _data_missing() -> str:
    return (
        f"the Tiny ImageNet training shards are not at {data_dir_from_env()} (no classes.csv): "
        "put them there, or point the tests at them with `make test DATA=/path/to/shards` "
        f"({DATA_DIR_ENV}=/path/to/shards for pytest itself)"
    )


def _tool(binary: str, how: str) -> _Prerequisite:
    def find() -> Path | None:
        found = shutil.which(binary)
        return None if found is None else Path(found)

    return _Prerequisite(find, lambda: f"{binary} is not on PATH: {how}")


# Keyed by the name of the fixture that provides it: the fixtures a selected test uses, directly
# or through other fixtures, say which prerequisites the run needs.
_PREREQUISITES: dict[str, _Prerequisite] = {
    "data_dir": _Prerequisite(_find_data, _data_missing),
    "kubectl_binary": _tool(
        "kubectl",
        "install it from your Kubernetes vendor (https://kubernetes.io/docs/tasks/tools/; "
        "kustomize is built in)",
    ),
    "promtool": _tool("promtool", _DEPLOY_TOOLS),
    "prometheus_binary": _tool("prometheus", _DEPLOY_TOOLS),
}


def _require_all() -> bool:
    return os.environ.get(REQUIRE_ALL_ENV) == "1"


def _look_for(name: str) -> Path | str:
    """The prerequisite's path, or a message saying what is missing and how to get it."""
    prerequisite = _PREREQUISITES[name]
    try:
        found = prerequisite.find()
        return prerequisite.missing() if found is None else found
    except SettingsError as exc:
        return str(exc)


def _require(name: str) -> Path:
    found = _look_for(name)
    if isinstance(found, Path):
        return found
    if _require_all():
        pytest.fail(f"{found} ({REQUIRE_ALL_ENV}=1)", pytrace=False)
    pytest.skip(f"{found} (`make test` fails on this instead of skipping)")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under FIELDLENS_REQUIRE_ALL=1, a missing prerequisite of a selected test ends the run
    here, before any test (and so any server) starts."""
    if not _require_all():
        return
    needed = {
        name
        for item in session.items
        for name in getattr(item, "fixturenames", ())
        if name in _PREREQUISITES
    }
    missing = [found for found in map(_look_for, sorted(needed)) if isinstance(found, str)]
    if missing:
        listed = "".join(f"\n  - {m}" for m in missing)
        raise pytest.UsageError(
            f"{REQUIRE_ALL_ENV}=1 (`make test`): the selected tests need what this machine "
            f"lacks, so none was run:{listed}"
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The seed of the random test order (pytest-randomly), also under `-q`, which hides the
    header that names it: a failure that needs another test to run first can be repeated."""
    seed = getattr(terminalreporter.config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(
            f"tests ran in a random order; repeat it with --randomly-seed={seed}"
        )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The Tiny ImageNet shards: FIELDLENS_DATA_DIR, else beside the checkout."""
    return _require("data_dir")


@pytest.fixture(scope="session")
def kubectl_binary() -> Path:
    return _require("kubectl_binary")


@pytest.fixture(scope="session")
def promtool() -> str:
    return str(_require("promtool"))


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    return _require("prometheus_binary")
