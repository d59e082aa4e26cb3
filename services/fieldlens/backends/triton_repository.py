"""Loading a stored model set's nets into running Triton servers (explicit model control).

Each net is sent with its configuration and files in Triton's repository `load` request, under
the name `<net><suffix>`, next to the nets already serving; nothing is unloaded until the caller
says so. Triton therefore needs no access to the model store, and a Triton replica that
restarts (and comes back with only its repository's boot nets) is simply loaded again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from fieldlens.backends.triton_client import BROAD_MODEL as BOOT_BROAD
from fieldlens.common import model_store
from fieldlens.common.errors import FailedPrecondition, Unavailable
from fieldlens.common.model_set import ModelSet
from fieldlens.common.model_store import triton_suffix

logger = logging.getLogger(__name__)

CONFIG = "config.pbtxt"
LOAD_TIMEOUT_S = 300.0


def nets(triton_dir: Path) -> list[Path]:
    """The net directories of a stored Triton repository."""
    if not triton_dir.is_dir():
        raise FailedPrecondition(f"no Triton repository at {triton_dir}")
    return sorted(p for p in triton_dir.iterdir() if (p / CONFIG).is_file())


def load_request(net_dir: Path, name: str) -> tuple[str, dict[str, bytes]]:
    """(config as JSON, files) of one net for Triton's load request, renamed to `name`."""
    config = text_format.Parse((net_dir / CONFIG).read_text(), model_config_pb2.ModelConfig())
    config.name = name
    files = {
        f"file:{p.relative_to(net_dir).as_posix()}": p.read_bytes()
        for p in sorted(net_dir.rglob("*"))
        if p.is_file() and p.name != CONFIG and "__pycache__" not in p.parts
    }
    if not files:
        raise FailedPrecondition(f"{net_dir} has no model files")
    return json_format.MessageToJson(config, preserving_proto_field_name=True), files


def endpoints(addr: str) -> list[str]:
    """Every server behind `addr`: a headless Kubernetes Service resolves to one address per
    Triton pod, and each pod must load the nets; a plain host:port is one server."""
    host, _, port = addr.rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError):
        return [addr]
    found: list[str] = []
    for family, *_, sockaddr in infos:
        ip = str(sockaddr[0])
        target = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if target not in found:
            found.append(target)
    return found or [addr]


async def load_nets(
    addr: str, requests: Sequence[tuple[str, Path | None]], timeout_s: float = LOAD_TIMEOUT_S
) -> list[str]:
    """Loads nets on every server behind `addr`; returns their names. Each request is
    (name, net directory to send), or (name, None) for a net of Triton's own repository. Nets
    already ready are left alone.

    Raises:
        Unavailable: a server cannot be reached or failed to load a net.
    """
    for endpoint in await asyncio.to_thread(endpoints, addr):
        client = InferenceServerClient(endpoint)
        try:
            for name, net_dir in requests:
                if await _ready(client, name):
                    continue
                logger.info("triton %s: loading %s", endpoint, name)
                if net_dir is None:
                    await client.load_model(name, client_timeout=timeout_s)
                else:
                    config, files = await asyncio.to_thread(load_request, net_dir, name)
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
    return [name for name, _ in requests]


async def unload_nets(addr: str, names: Sequence[str]) -> None:
    """Unloads `names` on every server behind `addr`; failures are logged, not raised (an
    idle net left loaded costs memory, not answers)."""
    for endpoint in await asyncio.to_thread(endpoints, addr):
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
        return bool(await client.is_model_ready(name))
    except (InferenceServerException, grpc.RpcError):
        return False


async def ensure_model_set(addr: str, store: Path, model_set: ModelSet) -> list[str]:
    """Has every server behind `addr` serve `model_set`'s nets: the boot set's from Triton's
    own repository, a stored set's sent from the store under suffixed names. Idempotent."""
    names = [model_set.broad_model, *(s.model for s in model_set.specialists.values())]
    if model_set.broad_model == BOOT_BROAD:
        return await load_nets(addr, [(n, None) for n in names])
    suffix = triton_suffix(model_set.version)
    stored = {d.name + suffix: d for d in nets(model_store.triton_dir(store, model_set.version))}
    missing = [n for n in names if n not in stored]
    if missing:
        raise FailedPrecondition(f"model set {model_set.version} has no nets {missing} in {store}")
    return await load_nets(addr, [(n, stored[n]) for n in names])
