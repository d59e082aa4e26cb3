"""Every Triton server behind one target: resolving it, spreading calls, loading nets on each.

The servers are in-process KServe v2 gRPC servers (the protocol tritonserver speaks), so a
server can lack a net, lose one or be down on purpose; the real tritonserver's answers to the
same calls (NOT_FOUND for an unknown net) are checked by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fieldlens.backends.triton_client import EMBEDDING, TritonClient
from fieldlens.backends.triton_repository import load_nets
from fieldlens.cluster import free_port
from fieldlens.common.errors import InvalidInput, Unavailable
from fieldlens.common.settings import REPO_ROOT
from fieldlens.common.targets import dns_name, servers

REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
IMAGES = np.zeros((1, 64, 64, 3), np.uint8)


# -- resolving targets ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:8001", ["127.0.0.1:8001"]),
        ("dns:///127.0.0.1:8001", ["127.0.0.1:8001"]),
        ("dns://10.0.0.10:53/127.0.0.1:8001", ["127.0.0.1:8001"]),
        ("ipv4:127.0.0.1:8001,127.0.0.1:8011", ["127.0.0.1:8001", "127.0.0.1:8011"]),
        ("ipv4:127.0.0.1:8001,127.0.0.1:8001", ["127.0.0.1:8001"]),
        ("ipv6:[::1]:8001,[::1]:8011", ["[::1]:8001", "[::1]:8011"]),
        ("unix:/run/triton.sock", ["unix:/run/triton.sock"]),
    ],
)
def test_a_target_names_every_server_behind_it(target, expected):
    assert servers(target) == expected


def test_a_dns_name_resolves_to_its_addresses():
    found = servers("dns:///localhost:8001")
    assert found and all(a.endswith(":8001") for a in found)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("triton", "has no port"),
        ("ipv4:", "lists no address"),
        ("http://triton:8001", "unknown scheme"),
        ("triton:http", "bad port"),
    ],
)
def test_a_malformed_target_is_refused(target, message):
    with pytest.raises(InvalidInput, match=message):
        servers(target)


def test_a_name_that_does_not_resolve_is_unavailable_not_taken_as_an_address():
    with pytest.raises(Unavailable, match="no-such-host.invalid does not resolve"):
        servers("dns:///no-such-host.invalid:8001")


# -- fake Triton servers --------------------------------------------------------------------------
class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A KServe v2 server with a set of ready nets; records what it was asked."""

    def __init__(self, nets: set[str]) -> None:
        self.nets = set(nets)
        self.inferred: list[str] = []
        self.loaded: list[tuple[str, dict]] = []
        self.unloaded: list[str] = []

    async def ServerLive(self, request, context):  # noqa: N802
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=request.name in self.nets)

    async def ModelInfer(self, request, context):  # noqa: N802
        if request.model_name not in self.nets:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Request for unknown model: '{request.model_name}' is not found",
            )
        self.inferred.append(request.model_name)
        out = service_pb2.ModelInferResponse(model_name=request.model_name)
        n = request.inputs[0].shape[0]
        for o in request.outputs:
            out.outputs.add(name=o.name, datatype="FP32", shape=[n, 2])
            out.raw_output_contents.append(np.ones((n, 2), np.float32).tobytes())
        return out

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        config = request.parameters["config"].string_param if "config" in request.parameters else ""
        self.loaded.append((request.model_name, json.loads(config) if config else {}))
        self.nets.add(request.model_name)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        self.unloaded.append(request.model_name)
        self.nets.discard(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()


@asynccontextmanager
async def fake_tritons(*nets: set[str]) -> AsyncIterator[tuple[str, list[FakeTriton], list]]:
    """Servers with those nets; yields (an `ipv4:` target naming all, fakes, grpc servers)."""
    fakes, running, addrs = [], [], []
    for ready in nets:
        fake, server = FakeTriton(ready), grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        fakes.append(fake)
        running.append(server)
        addrs.append(f"127.0.0.1:{port}")
    try:
        yield "ipv4:" + ",".join(addrs), fakes, running
    finally:
        for server in running:
            await server.stop(None)


async def _infer(client: TritonClient, model: str = "broad") -> np.ndarray:
    (out,) = await client.infer(model, IMAGES, (EMBEDDING,), timeout_s=2.0)
    return out


# -- calls over several servers -------------------------------------------------------------------
def test_calls_go_round_every_server():
    async def body() -> None:
        async with fake_tritons({"broad"}, {"broad"}) as (target, fakes, _):
            client = TritonClient(target)
            for _ in range(6):
                assert (await _infer(client)).shape == (1, 2)
            assert [len(f.inferred) for f in fakes] == [3, 3]
            await client.close()

    asyncio.run(body())


def test_a_server_that_lost_the_net_is_skipped_until_it_has_it_again():
    async def body() -> None:
        async with fake_tritons({"broad"}, set()) as (target, fakes, _):
            client = TritonClient(target)
            # Every call is answered: the one the server without the net gets NOT_FOUND for
            # is tried on the other, and that server is not asked for the net again.
            for _ in range(6):
                await _infer(client)
            assert len(fakes[0].inferred) == 6 and fakes[1].inferred == []
            assert await client.refresh(["broad"]) == {client.servers()[1]: ["broad"]}
            fakes[1].nets.add("broad")  # loaded by the follow-up
            assert await client.refresh(["broad"]) == {}
            for _ in range(4):
                await _infer(client)
            assert len(fakes[1].inferred) == 2
            await client.close()

    asyncio.run(body())


def test_a_server_that_is_down_does_not_fail_calls():
    async def body() -> None:
        async with fake_tritons({"broad"}, {"broad"}) as (target, fakes, running):
            client = TritonClient(target)
            await running[1].stop(None)
            for _ in range(4):
                await _infer(client)
            assert len(fakes[0].inferred) == 4
            assert await client.refresh(["broad"]) == {client.servers()[1]: ["broad"]}
            assert await client.model_ready("broad")
            await client.close()

    asyncio.run(body())


def test_no_server_with_the_net_is_unavailable_naming_it():
    async def body() -> None:
        async with fake_tritons(set(), set()) as (target, _, _):
            client = TritonClient(target)
            with pytest.raises(Unavailable, match="triton broad unavailable .*NOT_FOUND"):
                await _infer(client)
            assert not await client.model_ready("broad")
            await client.close()

    asyncio.run(body())


# -- loading nets on every server -----------------------------------------------------------------
def test_nets_are_loaded_on_every_server_with_the_deployments_kind():
    async def body() -> None:
        async with fake_tritons(set(), {"broad__v"}) as (target, fakes, _):
            await load_nets(target, [("broad__v", REPOSITORY / "broad")], kind="KIND_GPU")
            assert [name for name, _ in fakes[0].loaded] == ["broad__v"]
            assert fakes[1].loaded == []  # already ready there: left alone
            kinds = {g["kind"] for g in fakes[0].loaded[0][1]["instance_group"]}
            assert kinds == {"KIND_GPU"}

    asyncio.run(body())


def test_a_server_that_is_down_is_skipped_and_none_reached_is_unavailable():
    async def body() -> None:
        async with fake_tritons(set(), set()) as (target, fakes, running):
            await running[0].stop(None)
            await load_nets(target, [("broad__v", REPOSITORY / "broad")])
            assert fakes[0].loaded == [] and [n for n, _ in fakes[1].loaded] == ["broad__v"]
            await running[1].stop(None)
            with pytest.raises(Unavailable, match="no Triton server behind .* could be reached"):
                await load_nets(target, [("broad__w", REPOSITORY / "broad")])

    asyncio.run(body())


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("dns:///tiny:50053", "tiny"),
        ("tiny.fieldlens.svc:50053", "tiny.fieldlens.svc"),
        ("dns://10.0.0.10:53/tiny:50053", "tiny"),
        ("127.0.0.1:50053", None),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", None),
        ("unix:/run/tiny.sock", None),
    ],
)
def test_the_dns_name_a_target_resolves_is_what_tls_checks(target, name):
    assert dns_name(target) == name
