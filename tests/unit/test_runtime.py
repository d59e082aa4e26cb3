"""How a fieldlens process runs: event loop, gRPC core experiments, garbage collector."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
from service_process import python_json, tiny_log_until

from fieldlens.common import runtime
from fieldlens.common.runtime import (
    EVENT_LOOP_ENV,
    GC_GEN0_THRESHOLD,
    GRPC_EXPERIMENTS,
    GRPC_EXPERIMENTS_ENV,
)
from fieldlens.common.settings import CommonSettings, RouterSettings, SettingsError


def _env_without_grpc_experiments(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != GRPC_EXPERIMENTS_ENV}
    return {**env, **extra}


def test_importing_fieldlens_changes_no_environment() -> None:
    """No import-time side effect: only the entry points configure gRPC's core."""
    code = (
        "import json, os, fieldlens, fieldlens.router.service, grpc\n"
        f"print(json.dumps(os.environ.get({GRPC_EXPERIMENTS_ENV!r})))"
    )
    assert python_json(code, _env_without_grpc_experiments()) is None


def test_configure_and_undo_on_a_mapping() -> None:
    env: dict[str, str] = {}
    assert runtime.configure_grpc_core(env) is True
    assert env == {GRPC_EXPERIMENTS_ENV: GRPC_EXPERIMENTS}
    assert runtime.configure_grpc_core(env) is False  # already set: left alone
    assert runtime.without_fieldlens_grpc_core(env) == {}
    # Triton keeps what an operator set; only ours is taken away.
    mine = {GRPC_EXPERIMENTS_ENV: "-event_engine_client", "OTHER": "1"}
    assert runtime.without_fieldlens_grpc_core(dict(mine)) == mine


def test_event_loop_setting_defaults_to_uvloop_and_names_the_choices() -> None:
    assert CommonSettings.from_env("tiny", {}).event_loop == "uvloop"
    assert RouterSettings.from_env({EVENT_LOOP_ENV: " AsyncIO "}).common.event_loop == "asyncio"
    with pytest.raises(SettingsError, match=rf"^{EVENT_LOOP_ENV}='trio': .*uvloop, asyncio"):
        CommonSettings.from_env("router", {EVENT_LOOP_ENV: "trio"})


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_run_uses_the_loop_named(loop: runtime.EventLoop) -> None:
    async def name() -> str:
        return runtime.running_loop_name()

    assert runtime.run(name(), loop) == loop


def test_settle_heap_freezes_start_up_objects_and_raises_gen0() -> None:
    before = gc.get_threshold()
    keep = [[i] for i in range(1000)]  # lists: always tracked by the collector
    try:
        frozen = runtime.settle_heap()
        assert frozen >= len(keep)
        assert gc.get_freeze_count() == frozen
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize(
    ("setting", "operator", "loop", "experiments"),
    [
        (None, None, "uvloop", GRPC_EXPERIMENTS),
        ("asyncio", None, "asyncio", GRPC_EXPERIMENTS),
        (None, "", "uvloop", ""),  # an operator's GRPC_EXPERIMENTS, even empty, is kept
    ],
)
def test_a_started_service_reports_how_it_runs(
    tmp_path: Path, setting: str | None, operator: str | None, loop: str, experiments: str
) -> None:
    """The service chooses for itself (no launcher sets GRPC_EXPERIMENTS or the loop) and
    says so in its log once it serves, after freezing what start-up built."""
    env = _env_without_grpc_experiments()
    env.pop(EVENT_LOOP_ENV, None)
    if setting is not None:
        env[EVENT_LOOP_ENV] = setting
    if operator is not None:
        env[GRPC_EXPERIMENTS_ENV] = operator
    text, returncode = tiny_log_until(tmp_path, env, "frozen out of the collector")
    line = next((ln for ln in text.splitlines() if "frozen out of the collector" in ln), None)
    assert line is not None, text
    assert f"runs on {loop}; gRPC core experiments {experiments!r}" in line
    frozen = int(line.split("; ")[-1].split()[0])
    assert frozen > 10_000, line  # start-up builds far more than a handful of objects
    assert returncode == 0, text  # and it still stops cleanly on SIGTERM
