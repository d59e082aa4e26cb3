"""`fieldlens model-set`: the store it publishes into and lists, and the metrics it shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fieldlens import cli
from fieldlens.common import model_store
from fieldlens.common.settings import MODEL_STORE_ENV, REPO_ROOT

SHIPPED = REPO_ROOT / "deploy" / "models"


@pytest.fixture
def nets(tmp_path: Path) -> Path:
    """A stand-in Triton repository: publish copies it as it is, and list never reads it."""
    repository = tmp_path / "model_repository"
    (repository / "broad" / "1").mkdir(parents=True)
    (repository / "broad" / "config.pbtxt").write_text('name: "broad"\n')
    return repository


@pytest.fixture
def shipped_version() -> str:
    return str(json.loads((SHIPPED / "manifest.json").read_text())["model_set_version"])


def _publish(*extra: str, nets: Path) -> int:
    return cli.main(
        ["model-set", "publish", "--models", str(SHIPPED), "--model-repository", str(nets), *extra]
    )


def test_publish_goes_to_the_store_named_by_the_environment(
    tmp_path, monkeypatch, nets, shipped_version
):
    store = tmp_path / "from-env"
    monkeypatch.setenv(MODEL_STORE_ENV, str(store))
    assert _publish(nets=nets) == 0
    assert model_store.published(store) == [shipped_version]


def test_store_option_wins_over_the_environment(tmp_path, monkeypatch, nets, shipped_version):
    env_store, option_store = tmp_path / "from-env", tmp_path / "from-option"
    monkeypatch.setenv(MODEL_STORE_ENV, str(env_store))
    assert _publish("--store", str(option_store), nets=nets) == 0
    assert model_store.published(option_store) == [shipped_version]
    assert not env_store.exists()


def test_list_shows_the_validation_metrics_of_the_manifest(
    tmp_path, monkeypatch, capsys, nets, shipped_version
):
    store = tmp_path / "store"
    monkeypatch.delenv(MODEL_STORE_ENV, raising=False)
    assert _publish("--store", str(store), nets=nets) == 0
    capsys.readouterr()
    assert cli.main(["model-set", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    validation = json.loads((SHIPPED / "manifest.json").read_text())["metrics"]["validation"]
    row = next(line for line in out.splitlines() if shipped_version in line)
    assert f"{validation['fine_top1']:.1%}" in row
    assert f"{validation['broad_top1']:.1%}" in row
    assert "0.0%" not in row


def test_a_missing_metric_shows_as_unknown_not_zero():
    assert cli._validation_metric({"metrics": {"validation": {"fine_top1": 0.5}}}, "fine_top1") == (
        "50.0%"
    )
    assert cli._validation_metric({"metrics": {}}, "fine_top1") == "-"
    assert cli._validation_metric({}, "broad_top1") == "-"
