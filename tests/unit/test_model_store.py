"""The model store (publish, current), the classifier services' loaded sets, and the
Triton load requests built from a stored net."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from fieldlens.backends.triton_repository import load_request
from fieldlens.common import model_store
from fieldlens.common.errors import FailedPrecondition, InvalidInput, NotFound
from fieldlens.common.loaded_sets import LoadedModelSets
from fieldlens.common.settings import REPO_ROOT
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc

SHIPPED = REPO_ROOT / "deploy" / "models"
REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, str]:
    """The shipped model set, copied and re-versioned (a second release of the same nets)."""
    models = tmp_path / "models"
    shutil.copytree(SHIPPED, models)
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["model_set_version"] = "ms-test-release"
    (models / "manifest.json").write_text(json.dumps(manifest))
    return models, "ms-test-release"


def test_publish_is_atomic_idempotent_and_loads_with_suffixed_nets(tmp_path, release):
    models, version = release
    store = tmp_path / "store"
    assert model_store.publish(store, models, REPOSITORY) == version
    assert model_store.published(store) == [version]
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no staging left
    (models / "manifest.json").write_text("{}")  # a second publish does not copy again
    assert model_store.publish(store, SHIPPED, REPOSITORY) != version
    ms = model_store.load(store, version)
    assert ms.broad_model == "broad__" + version
    assert all(s.model.endswith("__" + version) for s in ms.specialists.values())
    assert (model_store.triton_dir(store, version) / "broad" / "config.pbtxt").is_file()


def test_current_names_the_served_set_and_the_boot_set_keeps_plain_names(tmp_path, release):
    models, version = release
    store = tmp_path / "store"
    model_store.publish(store, models, REPOSITORY)
    assert model_store.current(store) is None
    assert model_store.load_served(store, SHIPPED).broad_model == "broad"
    model_store.set_current(store, version)
    assert model_store.current(store) == version
    assert model_store.load_served(store, SHIPPED).version == version
    boot_version = json.loads((SHIPPED / "manifest.json").read_text())["model_set_version"]
    assert model_store.load_version(store, SHIPPED, boot_version).broad_model == "broad"


def test_unpublished_or_malformed_versions_are_refused(tmp_path):
    with pytest.raises(NotFound, match="not published"):
        model_store.load(tmp_path, "ms-nope")
    for bad in ("", "../x", ".hidden"):
        with pytest.raises(FailedPrecondition, match=re.escape(f"bad model-set version {bad!r}")):
            model_store.set_current(tmp_path, bad)
    with pytest.raises(NotFound, match="manifest.json is missing"):
        model_store.publish(tmp_path / "store", tmp_path, REPOSITORY)


def test_load_request_renames_the_net_and_sends_its_files():
    config_json, files = load_request(REPOSITORY / "broad", "broad__ms-x")
    config = json_format.Parse(config_json, model_config_pb2.ModelConfig())
    assert config.name == "broad__ms-x"
    assert config.backend == "python" and config.max_batch_size > 0
    assert set(files) == {"file:1/model.pt", "file:1/model.py"}
    assert files["file:1/model.pt"] == (REPOSITORY / "broad" / "1" / "model.pt").read_bytes()


@pytest.mark.parametrize("kind", ["KIND_GPU", "KIND_CPU"])
def test_load_request_gives_the_deployments_instance_kind(kind):
    stored = text_format.Parse(
        (REPOSITORY / "broad" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config_json, _ = load_request(REPOSITORY / "broad", "broad__ms-x", kind)
    config = json_format.Parse(config_json, model_config_pb2.ModelConfig())
    assert config.instance_group
    assert {
        model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group
    } == {kind}
    # Only the kind changes: counts stay the stored config's.
    assert [g.count for g in config.instance_group] == [g.count for g in stored.instance_group]


def test_load_request_without_a_kind_keeps_the_stored_one():
    stored = text_format.Parse(
        (REPOSITORY / "broad" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config = json_format.Parse(
        load_request(REPOSITORY / "broad", "broad__ms-x")[0], model_config_pb2.ModelConfig()
    )
    assert list(config.instance_group) == list(stored.instance_group)


def test_load_request_refuses_an_unknown_kind():
    with pytest.raises(InvalidInput, match="instance kind 'KIND_TPU' is not one of"):
        load_request(REPOSITORY / "broad", "broad__ms-x", "KIND_TPU")


class _Describes(classifier_pb2_grpc.ClassifierServicer):
    def __init__(self, version: str) -> None:
        self.version = version

    async def Describe(self, request, context):  # noqa: N802
        return classifier_pb2.DescribeResponse(model_set_version=self.version)

    async def Learn(self, request, context):  # noqa: N802
        return classifier_pb2.LearnExamplesResponse(learned_total=len(self.version))


def test_loaded_sets_dispatch_by_version_and_keep_the_newest():
    async def factory(version: str) -> _Describes:
        if version == "broken":
            raise OSError("tiny.npz is truncated")
        return _Describes(version)

    async def scenario() -> None:
        sets = LoadedModelSets("a", _Describes("a"), factory, keep=2)
        describe = classifier_pb2.DescribeRequest
        assert (await sets.Describe(describe(), None)).model_set_version == "a"
        reply = await sets.LoadModelSet(classifier_pb2.LoadModelSetRequest(version="b"), None)
        assert reply.model_set_version == "b"
        assert sets.default == "b"
        # The set a router is switching away from still answers requests that name it.
        assert (await sets.Describe(describe(model_set_version="a"), None)).model_set_version == "a"
        assert (await sets.Describe(describe(), None)).model_set_version == "b"
        await sets.load("c")
        assert sets.versions == ["b", "c"]
        with pytest.raises(FailedPrecondition, match="not loaded here"):
            await sets.Describe(describe(model_set_version="a"), None)
        await sets.load("b")  # loaded already: becomes the default again, nothing rebuilt
        assert sets.versions == ["c", "b"]
        with pytest.raises(FailedPrecondition, match="truncated"):
            await sets.load("broken")
        assert sets.versions == ["c", "b"]
        with pytest.raises(InvalidInput, match="version is required"):
            await sets.LoadModelSet(classifier_pb2.LoadModelSetRequest(), None)

    asyncio.run(scenario())


def test_the_specialist_catches_up_only_the_served_set_and_a_candidate(tmp_path, release):
    """Its Triton catch-up loads the nets of the set the routers serve and of a rollout's
    candidate, never those of a set it still holds after a switch retired it."""
    from fieldlens.specialist.service import served_versions

    models, version = release
    store = tmp_path / "store"
    model_store.publish(store, models, REPOSITORY)
    assert served_versions(store, "ms-boot") == {"ms-boot"}  # no switch yet
    model_store.set_current(store, version)
    assert served_versions(store, "ms-boot") == {version}  # the boot set is retired
    model_store.set_rollout(store, model_store.RolloutState("ms-boot", canary_weight=0.1))
    assert served_versions(store, "ms-boot") == {version, "ms-boot"}
    model_store.set_rollout(store, None)
    assert served_versions(store, "ms-boot") == {version}
