"""TLS on a real in-process grpc.aio server: TLS and mTLS ports, plaintext refused, certificates
reloaded when their files change, and whether a call came over TLS."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fieldlens.common import tls
from fieldlens.common.server import GrpcServer
from fieldlens.common.settings import SettingsError, tls_from_env
from fieldlens.common.tls import TlsFiles, local_pki, transport_is_secure

SECURE_METHOD = "/fieldlens.test.Probe/Secure"


def _probe(server: grpc.aio.Server) -> None:
    async def secure(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"1" if transport_is_secure(context) else b"0"

    handler = grpc.unary_unary_rpc_method_handler(secure)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("fieldlens.test.Probe", {"Secure": handler}),)
    )


async def _serve(files: TlsFiles | None) -> GrpcServer:
    server = GrpcServer(
        "127.0.0.1:0",
        [(lambda _, s: _probe(s), None)],
        ["fieldlens.test.Probe"],
        tls=files,
        health_addr=None,
    )
    await server.start()
    return server


async def _call(port: int, files: TlsFiles | None) -> bytes:
    async with tls.aio_channel(f"127.0.0.1:{port}", files) as channel:
        call = channel.unary_unary(SECURE_METHOD)
        return await call(b"", timeout=5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tls.LocalPki:
    return local_pki(tmp_path_factory.mktemp("pki"))


def test_the_local_pki_is_made_once(pki):
    again = local_pki(pki.ca.parent)
    assert again == pki
    assert all(p.stat().st_size > 0 for p in vars(pki).values())
    assert oct(pki.server_key.stat().st_mode & 0o777) == "0o600"


def test_a_tls_port_answers_tls_clients_only(pki):
    async def body() -> None:
        server = await _serve(pki.server_files(mtls=False))
        try:
            assert await _call(server.port, pki.client_files(with_certificate=False)) == b"1"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call(server.port, None)  # plaintext
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(body())


def test_a_plaintext_port_says_so(pki):
    async def body() -> None:
        server = await _serve(None)
        try:
            assert await _call(server.port, None) == b"0"
        finally:
            await server.stop(0)

    asyncio.run(body())


def test_mtls_needs_a_client_certificate_from_the_ca(pki, tmp_path):
    stranger = local_pki(tmp_path / "stranger")

    async def body() -> None:
        server = await _serve(pki.server_files(mtls=True))
        try:
            assert await _call(server.port, pki.client_files()) == b"1"
            for client in (
                pki.client_files(with_certificate=False),  # no certificate
                TlsFiles(stranger.client_cert, stranger.client_key, ca=pki.ca),  # another CA
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _call(server.port, client)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(body())


def test_a_rotated_certificate_is_served_without_a_restart(pki, tmp_path):
    """cert-manager rewrites the files in place; the next connection's handshake reads them."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    rotated = local_pki(tmp_path / "rotated")  # a new CA: old clients must stop trusting it

    async def body() -> None:
        server = await _serve(TlsFiles(cert, key))
        try:
            assert await _call(server.port, TlsFiles(ca=pki.ca)) == b"1"
            shutil.copy(rotated.server_cert, cert)
            shutil.copy(rotated.server_key, key)
            assert await _call(server.port, TlsFiles(ca=rotated.ca)) == b"1"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call(server.port, TlsFiles(ca=pki.ca))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(body())


def test_a_health_port_answers_plaintext_probes_beside_a_tls_port(pki):
    from fieldlens.cluster import free_port

    health_port = free_port()

    async def body() -> None:
        server = GrpcServer(
            "127.0.0.1:0",
            [(lambda _, s: _probe(s), None)],
            ["fieldlens.test.Probe"],
            tls=pki.server_files(mtls=True),
            health_addr=f"127.0.0.1:{health_port}",
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
                )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # Only health there: the service itself is not on the plaintext port.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await channel.unary_unary(SECURE_METHOD)(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(0)

    asyncio.run(body())


def test_tls_settings_name_what_is_missing(pki):
    files = tls_from_env(
        {
            "FIELDLENS_TLS_CERT": str(pki.server_cert),
            "FIELDLENS_TLS_KEY": str(pki.server_key),
            "FIELDLENS_TLS_CA": str(pki.ca),
        }
    )
    assert files == TlsFiles(pki.server_cert, pki.server_key, ca=pki.ca)
    assert tls_from_env({}) == TlsFiles()
    with pytest.raises(SettingsError, match="needs its key"):
        tls_from_env({"FIELDLENS_TLS_CERT": str(pki.server_cert)})
    with pytest.raises(SettingsError, match="mTLS .* needs the server's own certificate"):
        tls_from_env({"FIELDLENS_TLS_CLIENT_CA": str(pki.ca)})
    with pytest.raises(SettingsError, match="no such file"):
        tls_from_env({"FIELDLENS_TLS_CA": str(Path("/nonexistent/ca.pem"))})


def test_a_pod_dialled_by_address_is_checked_against_its_service_name(pki):
    """A router dials each tiny pod's address; the certificate names the Service."""

    async def call(port: int, server_name: str) -> bytes:
        files = pki.client_files(with_certificate=False)
        async with tls.aio_channel(f"127.0.0.1:{port}", files, None, server_name) as channel:
            return await channel.unary_unary(SECURE_METHOD)(b"", timeout=5)

    async def body() -> None:
        server = await _serve(pki.server_files(mtls=False))
        try:
            assert await call(server.port, "localhost") == b"1"  # named in the certificate
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(server.port, "tiny")  # not named: refused
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(body())
