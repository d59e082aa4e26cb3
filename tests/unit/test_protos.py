"""Generated fieldlens.v1 code: importable, shaped as the protos say, and not drifted."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen_protos() -> ModuleType:
    path = REPO_ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("gen_protos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_modules_import() -> None:
    from fieldlens.v1 import (
        classifier_pb2,
        classifier_pb2_grpc,
        router_pb2,
        router_pb2_grpc,
        taxonomy_pb2,
    )

    assert router_pb2.DESCRIPTOR.package == "fieldlens.v1"
    assert set(router_pb2.DESCRIPTOR.services_by_name) == {"Router"}
    assert set(classifier_pb2.DESCRIPTOR.services_by_name) == {"Classifier"}
    assert hasattr(router_pb2_grpc, "add_RouterServicer_to_server")
    assert hasattr(classifier_pb2_grpc, "ClassifierStub")
    assert taxonomy_pb2.Taxon(id="root", depth=0).id == "root"


def test_messages_carry_the_agreed_fields() -> None:
    from fieldlens.v1 import classifier_pb2, router_pb2

    response = router_pb2.ClassifyResponse(
        request_id="r1",
        error=router_pb2.ItemError(code=3, message="bad image"),
        degradations=[router_pb2.Degradation(kind=router_pb2.CACHE_UNAVAILABLE)],
        suggestions=[router_pb2.Suggestion(served_by=classifier_pb2.SPECIALIST)],
    )
    assert response.HasField("error")
    assert not router_pb2.ClassifyResponse().HasField("error")
    assert response.suggestions[0].served_by == classifier_pb2.SPECIALIST

    methods = router_pb2.DESCRIPTOR.services_by_name["Router"].methods_by_name
    assert methods["ClassifyStream"].client_streaming and methods["ClassifyStream"].server_streaming
    assert methods["IndexExemplars"].client_streaming
    assert not methods["IndexExemplars"].server_streaming


def test_generated_code_has_not_drifted(gen_protos: ModuleType) -> None:
    assert gen_protos.drift() == []


def test_drift_check_notices_edits_and_stale_files(gen_protos: ModuleType, tmp_path: Path) -> None:
    generated = gen_protos.generate(tmp_path / "fresh")
    copy = tmp_path / "copy"
    shutil.copytree(generated, copy)
    assert gen_protos._compare(generated, copy) == []

    (copy / "router_pb2.py").write_text("# edited by hand\n")
    (copy / "old_pb2.py").write_text("")
    (copy / "taxonomy_pb2.pyi").unlink()
    assert gen_protos._compare(generated, copy) == [
        "missing: taxonomy_pb2.pyi",
        "stale: old_pb2.py",
        "differs: router_pb2.py",
    ]
