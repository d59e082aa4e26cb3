"""Loading a stored model set's nets into running Triton servers (explicit model control).

Each net is sent with its configuration and files in Triton's repository `load` request, under
the name `<net><suffix>`, next to the nets already serving, to every server behind the Triton
target (common/targets.py); nothing is unloaded until the caller says so. Triton therefore
needs no access to the model store, and a Triton replica that restarts or is added (and comes
with only its repository's boot nets) is simply loaded again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from fieldlens.backends.triton_client import BROAD_MODEL as BOOT_BROAD
from fieldlens.common import model_store, targets
from fieldlens.common.errors import FailedPrecondition, InvalidInput, Unavailable
from fieldlens.common.model_set import ModelSet
from fieldlens.common.model_store import triton_suffix
from fieldlens.common.settings import TRITON_INSTANCE_KINDS

logger = logging.getLogger(__name__)

CONFIG = "config.pbtxt"
LOAD_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 2.0


def nets(triton_dir: Path) -> list[Path]:
    """The net directories of a stored Triton repository."""
    if not triton_dir.is_dir():
        raise FailedPrecondition(f"no Triton repository at {triton_dir}")
    return sorted(p for p in triton_dir.iterdir() if (p / CONFIG).is_file())


def load_request(net_dir: Path, name: str, kind: str = "") -> tuple[str, dict[str, bytes]]:
    """(config as JSON, files) of one net for Triton's load request, renamed to `name`, its
    instances of `kind` (KIND_GPU, KIND_CPU) when given: the deployment's, not the stored
    config's (a set is trained and stored on a CPU machine, and served on GPU nodes)."""
    config = text_format.Parse((net_dir / CONFIG).read_text(), model_config_pb2.ModelConfig())
    config.name = name
    if kind:
        if kind not in TRITON_INSTANCE_KINDS:
            raise InvalidInput(f"instance kind {kind!r} is not one of {TRITON_INSTANCE_KINDS}")
        if not config.instance_group:
            config.instance_group.add(count=1)
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.Kind.Value(kind)
    files = {
        f"file:{p.relative_to(net_dir).as_posix()}": p.read_bytes()
        for p in sorted(net_dir.rglob("*"))
        if p.is_file() and p.name != CONFIG and "__pycache__" not in p.parts
    }
    if not files:
        raise FailedPrecondition(f"{net_dir} has no model files")
    return json_format.MessageToJson(config, preserving_proto_field_name=True), files


async def load_nets(
    addr: str,
    requests: Sequence[tuple[str, Path | None]],
    timeout_s: float = LOAD_TIMEOUT_S,
    kind: str = "",
    only: Sequence[str] | None = None,
) -> list[str]:
    """Loads nets on every server behind the target `addr` (or on the servers `only`);
    returns their names. Each request is (name, net directory to send), or (name, None) for a
    net of Triton's own repository. Nets already ready are left alone.

    A server that cannot be reached is skipped (it gets the nets when it is back: the owner's
    follow-up loads whatever a server lacks); one that is reached and fails to load fails the
    call, and so does a call that reached none.

    Raises:
        Unavailable: no server was reached, or one failed to load a net.
    """
    reached = 0
    servers = list(only) if only is not None else await asyncio.to_thread(targets.servers, addr)
    for endpoint in servers:
        client = InferenceServerClient(endpoint)
        try:
            if not await _reachable(client):
                logger.warning("triton %s unreachable: it gets its nets when it is back", endpoint)
                continue
            reached += 1
            for name, net_dir in requests:
                if await _ready(client, name):
                    continue
                logger.info("triton %s: loading %s", endpoint, name)
                if net_dir is None:
                    await client.load_model(name, client_timeout=timeout_s)
                else:
                    config, files = await asyncio.to_thread(load_request, net_dir, name, kind)
                    await client.load_model(
                        name, config=config, files=files, client_timeout=timeout_s
                    )
                if not await _ready(client, name):
                    raise Unavailable(f"triton {endpoint} loaded {name} but it is not ready")
        except (InferenceServerException, grpc.RpcError) as exc:
            raise Unavailable(
                f"triton {endpoint} cannot load {[n for n, _ in requests]}: {exc}"
            ) from exc
        finally:
            await client.close()
    if not reached:
        raise Unavailable(f"no Triton server behind {addr} could be reached ({servers})")
    return [name for name, _ in requests]


async def unload_nets(addr: str, names: Sequence[str]) -> None:
    """Unloads `names` on every server behind `addr`; failures are logged, not raised (an
    idle net left loaded costs memory, not answers)."""
    for endpoint in await asyncio.to_thread(targets.servers, addr):
        client = InferenceServerClient(endpoint)
        try:
            for name in names:
                await client.unload_model(name)
                logger.info("triton %s: unloaded %s", endpoint, name)
        except (InferenceServerException, grpc.RpcError) as exc:
            logger.warning("triton %s: cannot unload %s: %s", endpoint, list(names), exc)
        finally:
            await client.close()


async def _ready(client: InferenceServerClient, name: str) -> bool:
    try:
        return bool(await client.is_model_ready(name, client_timeout=READY_TIMEOUT_S))
    except (InferenceServerException, grpc.RpcError):
        return False


async def _reachable(client: InferenceServerClient) -> bool:
    try:
        return bool(await client.is_server_live(client_timeout=READY_TIMEOUT_S))
    except (InferenceServerException, grpc.RpcError):
        return False


def nets_of(model_set: ModelSet) -> list[str]:
    """The Triton nets a model set is served by: its broad net and its specialists'."""
    return [model_set.broad_model, *(s.model for s in model_set.specialists.values())]


async def ensure_model_set(
    addr: str,
    store: Path,
    model_set: ModelSet,
    kind: str = "",
    only: Sequence[str] | None = None,
) -> list[str]:
    """Has every server behind `addr` (or the servers `only`) serve `model_set`'s nets: the
    boot set's from Triton's own repository, a stored set's sent from the store under
    suffixed names, with instances of `kind` when given. Idempotent."""
    names = nets_of(model_set)
    if model_set.broad_model == BOOT_BROAD:
        return await load_nets(addr, [(n, None) for n in names], only=only)
    suffix = triton_suffix(model_set.version)
    stored = {d.name + suffix: d for d in nets(model_store.triton_dir(store, model_set.version))}
    missing = [n for n in names if n not in stored]
    if missing:
        raise FailedPrecondition(f"model set {model_set.version} has no nets {missing} in {store}")
    return await load_nets(addr, [(n, stored[n]) for n in names], kind=kind, only=only)
