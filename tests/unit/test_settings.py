"""Settings: defaults, environment overrides and fail-fast validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fieldlens.common import settings as s
from fieldlens.common.settings import (
    ClassifierSettings,
    CommonSettings,
    RouterSettings,
    SettingsError,
)


def test_router_defaults() -> None:
    router = RouterSettings.from_env({})
    assert router.common.listen_addr == "127.0.0.1:50051"
    assert router.common.metrics_port == 9101
    assert router.common.metrics_addr == "127.0.0.1"
    assert router.common.max_message_bytes == 8 * 1024 * 1024
    assert router.common.grace_s == 5.0
    assert router.common.log_level == "INFO"
    assert router.common.models_dir == s.REPO_ROOT / "deploy" / "models"
    assert (router.triton_addr, router.specialist_addr, router.tiny_addr) == (
        "127.0.0.1:8001",
        "127.0.0.1:50052",
        "127.0.0.1:50053",
    )
    assert router.redis_addr == "127.0.0.1:6379"
    assert router.qdrant_addr is None
    assert router.qdrant_path == s.REPO_ROOT / ".run" / "qdrant"
    assert (router.cache_ttl_s, router.top_k, router.dispatch_top) == (3600, 5, 3)
    assert router.threshold is None, "unset: the model set's calibrated default threshold"
    assert router.max_image_bytes == 4 * 1024 * 1024
    assert router.max_pixels == 16_000_000
    assert router.stage_timeout_s == 1.0
    assert router.routing_path is None


def test_repo_root_is_the_checkout() -> None:
    assert (s.REPO_ROOT / "pyproject.toml").is_file()
    assert (s.REPO_ROOT / "services" / "fieldlens").is_dir()


def test_fieldlens_data_dir_moves_the_default_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    beside_the_checkout = s.REPO_ROOT.parent / "shared" / "data" / "tiny-imagenet"
    assert s.data_dir_from_env({}) == s.DEFAULT_DATA_DIR == beside_the_checkout
    assert s.data_dir_from_env({"FIELDLENS_DATA_DIR": str(tmp_path)}) == tmp_path
    # Relative to the repository root, like the Makefile's DATA (make runs from there).
    relative = {"FIELDLENS_DATA_DIR": "../elsewhere/tiny-imagenet"}
    assert s.data_dir_from_env(relative) == s.REPO_ROOT / "../elsewhere/tiny-imagenet"
    with pytest.raises(SettingsError, match="FIELDLENS_DATA_DIR"):
        s.data_dir_from_env({"FIELDLENS_DATA_DIR": ""})
    # Unset: the process environment, which `make test DATA=...` sets for the tests.
    monkeypatch.setenv("FIELDLENS_DATA_DIR", str(tmp_path))
    assert s.data_dir_from_env() == tmp_path


@pytest.mark.parametrize(
    ("role", "addr", "metrics_port"),
    [("specialist", "127.0.0.1:50052", 9102), ("tiny", "127.0.0.1:50053", 9103)],
)
def test_classifier_defaults(role: s.ClassifierRole, addr: str, metrics_port: int) -> None:
    classifier = ClassifierSettings.from_env(role, {})
    assert classifier.common.service == role
    assert classifier.common.listen_addr == addr
    assert classifier.common.metrics_port == metrics_port
    assert classifier.triton_addr == "127.0.0.1:8001"


def test_environment_overrides(tmp_path: Path) -> None:
    routing = tmp_path / "routing.json"
    routing.write_text('{"n02084071": "tiny"}')
    router = RouterSettings.from_env(
        {
            "FIELDLENS_LISTEN_ADDR": "0.0.0.0:6000",
            "FIELDLENS_METRICS_PORT": "0",
            "FIELDLENS_METRICS_ADDR": "0.0.0.0",
            "FIELDLENS_MAX_MESSAGE_BYTES": "1024",
            "FIELDLENS_GRACE_S": "0.5",
            "FIELDLENS_LOG_LEVEL": "debug",
            "FIELDLENS_MODELS_DIR": str(tmp_path),
            "TRITON_ADDR": "triton:8001",
            "SPECIALIST_ADDR": "[::1]:7000",
            "REDIS_ADDR": "",
            "QDRANT_ADDR": "qdrant:6334",
            "QDRANT_PATH": "var/qdrant",
            "FIELDLENS_THRESHOLD": "0.8",
            "FIELDLENS_TOP_K": " 10 ",
            "FIELDLENS_ROUTING": str(routing),
        }
    )
    assert router.common.listen_addr == "0.0.0.0:6000"
    assert router.common.metrics_port == 0
    assert router.common.metrics_addr == "0.0.0.0"
    assert router.common.max_message_bytes == 1024
    assert router.common.grace_s == 0.5
    assert router.common.log_level == "DEBUG"
    assert router.common.models_dir == tmp_path
    assert router.triton_addr == "triton:8001"
    assert router.specialist_addr == "[::1]:7000"
    assert router.redis_addr is None, "an empty REDIS_ADDR disables the cache"
    assert router.qdrant_addr == "qdrant:6334"
    assert router.qdrant_path == s.REPO_ROOT / "var" / "qdrant"
    assert router.threshold == 0.8
    assert router.top_k == 10
    assert router.routing_path == routing


def test_listen_port_zero_is_allowed_but_not_for_backends() -> None:
    assert CommonSettings.from_env("tiny", {"FIELDLENS_LISTEN_ADDR": "127.0.0.1:0"}).listen_addr
    with pytest.raises(SettingsError, match="TRITON_ADDR"):
        RouterSettings.from_env({"TRITON_ADDR": "127.0.0.1:0"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FIELDLENS_METRICS_PORT", "http"),
        ("FIELDLENS_METRICS_PORT", "70000"),
        ("FIELDLENS_LISTEN_ADDR", "localhost"),
        ("FIELDLENS_LISTEN_ADDR", "localhost:port"),
        ("TINY_ADDR", ":50053"),
        ("FIELDLENS_MAX_MESSAGE_BYTES", "0"),
        ("FIELDLENS_GRACE_S", "-1"),
        ("FIELDLENS_LOG_LEVEL", "LOUD"),
        ("FIELDLENS_THRESHOLD", "1.5"),
        ("FIELDLENS_THRESHOLD", "nan"),
        ("FIELDLENS_TOP_K", "five"),
        ("FIELDLENS_STAGE_TIMEOUT_S", "0"),
        ("FIELDLENS_ROUTING", "no/such/routing.json"),
    ],
)
def test_malformed_value_fails_fast_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        RouterSettings.from_env({name: value})
    assert err.value.name == name
    assert str(err.value).startswith(f"{name}={value!r}: ")


def test_settings_are_frozen() -> None:
    router = RouterSettings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'top_k'"):
        router.top_k = 3  # type: ignore[misc]
