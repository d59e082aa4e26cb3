"""CPU thread pools: the setting, its limits on real BLAS/OpenMP/torch pools, the services."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from service_process import python_json, tiny_log_until

from fieldlens.backends import triton_server
from fieldlens.backends.triton_python_model import THREADS_PARAMETER, instance_threads
from fieldlens.cluster import ClusterConfig
from fieldlens.common.settings import (
    CPU_THREADS_ENV,
    DEFAULT_CPU_THREADS,
    ClassifierSettings,
    CommonSettings,
    RouterSettings,
    SettingsError,
)
from fieldlens.common.threads import THREAD_ENV_VARS, child_env


def _bare_env(**extra: str) -> dict[str, str]:
    """This environment without the library thread variables: libraries start their
    default pools, as they would under a launcher that sets nothing."""
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_ENV_VARS, CPU_THREADS_ENV)}
    return {**env, **extra}


_LIMIT_IN_A_FRESH_PROCESS = """
import json, os, sys
import numpy
from threadpoolctl import threadpool_info
before = threadpool_info()
{extra_import}
from fieldlens.common.threads import set_cpu_threads
summary = set_cpu_threads({threads})
after = threadpool_info()
torch = sys.modules.get("torch")
print(json.dumps({{
    "before": before,
    "after": after,
    "summary": summary,
    "env": {{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                           "MKL_NUM_THREADS")}},
    "torch": None if torch is None else [torch.get_num_threads(),
                                         torch.get_num_interop_threads()],
}}))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_set_cpu_threads_limits_numpys_openblas_pool(threads: int) -> None:
    out = python_json(
        _LIMIT_IN_A_FRESH_PROCESS.format(threads=threads, extra_import=""), _bare_env()
    )
    assert any(p["internal_api"] == "openblas" for p in out["before"])
    after = [p for p in out["after"] if p["internal_api"] == "openblas"]
    assert [p["num_threads"] for p in after] == [threads]
    assert all(p["num_threads"] == threads for p in out["after"])
    assert out["summary"].startswith(f"CPU threads {threads} ({CPU_THREADS_ENV}): openblas=")
    # Libraries loaded later, and children, get the same count.
    assert out["env"] == dict.fromkeys(THREAD_ENV_VARS, str(threads))
    # torch was not imported, and setting the pools did not import it.
    assert out["torch"] is None


def test_set_cpu_threads_sets_torchs_pools_where_torch_is_loaded() -> None:
    out = python_json(
        _LIMIT_IN_A_FRESH_PROCESS.format(threads=2, extra_import="import torch"), _bare_env()
    )
    assert out["torch"] == [2, 2]
    assert out["summary"].endswith("; torch intra-op=2 inter-op=2")
    apis = {p["internal_api"]: p["num_threads"] for p in out["after"]}
    assert apis.get("openmp") == 2 and apis.get("openblas") == 2


def test_set_cpu_threads_refuses_zero() -> None:
    from fieldlens.common.threads import set_cpu_threads

    with pytest.raises(ValueError, match="at least 1"):
        set_cpu_threads(0)


def test_setting_defaults_to_one_and_is_read_by_every_service() -> None:
    assert DEFAULT_CPU_THREADS == 1
    assert CommonSettings.from_env("tiny", {}).cpu_threads == 1
    assert RouterSettings.from_env({CPU_THREADS_ENV: "3"}).common.cpu_threads == 3
    assert (
        ClassifierSettings.from_env("specialist", {CPU_THREADS_ENV: " 2 "}).common.cpu_threads == 2
    )


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", ""])
def test_a_malformed_setting_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{CPU_THREADS_ENV}=.*expected an integer"):
        CommonSettings.from_env("router", {CPU_THREADS_ENV: raw})


def test_a_service_with_a_malformed_setting_exits_with_the_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fieldlens.tiny"],
        env=_bare_env(**{CPU_THREADS_ENV: "many"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"tiny: {CPU_THREADS_ENV}='many': expected an integer" in done.stdout


def test_triton_model_threads_deployment_over_config_over_default() -> None:
    config = {"parameters": {THREADS_PARAMETER: {"string_value": "2"}}}
    assert instance_threads({}, {}) == 1
    assert instance_threads(config, {}) == 2
    assert instance_threads(config, {CPU_THREADS_ENV: "3"}) == 3
    with pytest.raises(SettingsError, match=THREADS_PARAMETER):
        instance_threads({"parameters": {THREADS_PARAMETER: {"string_value": "0"}}}, {})
    with pytest.raises(SettingsError, match=CPU_THREADS_ENV):
        instance_threads(config, {CPU_THREADS_ENV: "x"})


def test_launchers_pass_the_setting_to_children_as_library_variables(tmp_path: Path) -> None:
    assert child_env({}) == dict.fromkeys(THREAD_ENV_VARS, "1")
    assert child_env({CPU_THREADS_ENV: "4"}) == dict.fromkeys(THREAD_ENV_VARS, "4")
    # A malformed setting is left for the child to refuse with its own message.
    assert child_env({CPU_THREADS_ENV: "x"}) == {}
    cfg = ClusterConfig(run_dir=tmp_path, extra_env=((CPU_THREADS_ENV, "2"),))
    env = cfg.service_env("tiny")
    assert {k: env[k] for k in THREAD_ENV_VARS} == dict.fromkeys(THREAD_ENV_VARS, "2")
    stub = triton_server.stub_environment(_bare_env())
    assert {k: stub[k] for k in THREAD_ENV_VARS} == dict.fromkeys(THREAD_ENV_VARS, "1")


def test_with_the_library_variables_numpy_starts_no_blas_worker() -> None:
    code = "import json, os, numpy; print(json.dumps(len(os.listdir('/proc/self/task'))))"
    assert python_json(code, {**_bare_env(), **child_env({})}) == 1


@pytest.mark.parametrize("service", ["router", "tiny", "specialist"])
def test_services_do_not_import_torch(service: str) -> None:
    code = (
        "import json, sys, importlib\n"
        f"importlib.import_module('fieldlens.{service}.service')\n"
        "print(json.dumps('torch' in sys.modules))"
    )
    assert python_json(code, _bare_env()) is False


def test_a_started_tiny_service_limits_its_blas_pool(tmp_path: Path) -> None:
    """The service sizes its pool itself: no launcher variable is set, OpenBLAS starts with
    its default pool, and the log reports it limited to one thread before serving."""
    text, _ = tiny_log_until(tmp_path, _bare_env(), "listening on port")
    line = next(ln for ln in text.splitlines() if "CPU threads" in ln)
    assert f"CPU threads 1 ({CPU_THREADS_ENV})" in line
    assert re.findall(r"openblas=(\d+)", line) == ["1"], line
    assert "torch" not in line
    # Limited before serving.
    assert text.index("CPU threads") < text.index("listening on port")


def test_a_killed_tritons_shared_memory_is_removed_by_prefix_only(tmp_path: Path) -> None:
    mine = triton_server.shm_prefix_for(8001)
    for name in (f"{mine}a-b-c", f"{mine}d-e-f", f"{triton_server.shm_prefix_for(80011)}x", "y"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    assert triton_server.remove_shm_regions(mine, tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fieldlens_80011_x", "y"]
    assert triton_server.remove_shm_regions(mine, tmp_path) == 0
