"""TLS for every gRPC hop: server credentials reloaded when their files change, client channel
credentials, whether a call came over TLS, and a throwaway PKI for the local cluster.

A service serves TLS when given a certificate and key (FIELDLENS_TLS_CERT, FIELDLENS_TLS_KEY),
and asks its clients for certificates signed by FIELDLENS_TLS_CLIENT_CA when that is set (mTLS).
It calls other services over TLS when FIELDLENS_TLS_CA names the CA their certificates chain to,
presenting its own certificate for servers that ask. cert-manager rotates the files in place;
each new connection's handshake reads them again if they changed (no restart).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """A process's TLS material (paths to PEM files); all None = plaintext."""

    # The process's certificate chain and key: its server identity, and its client identity
    # towards servers that ask for one.
    cert: Path | None = None
    key: Path | None = None
    # Servers: clients must present a certificate signed by this CA (mTLS); None = not asked.
    client_ca: Path | None = None
    # Clients: the CA the servers this process calls chain to; None = they are called plaintext.
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS certificate needs its key, and a key its certificate")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("mTLS (a client CA) needs the server's own certificate and key")

    @property
    def serves(self) -> bool:
        return self.cert is not None

    @property
    def calls(self) -> bool:
        return self.ca is not None


class _Reloading:
    """Server certificate configuration, read again when a file's modification time changes
    (checked on each new connection's handshake)."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self.initial = self._config()

    def _paths(self) -> list[Path]:
        return [p for p in (self._files.cert, self._files.key, self._files.client_ca) if p]

    def _stamps(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._paths())

    def _config(self) -> Any:
        assert self._files.cert is not None and self._files.key is not None
        pair = (self._files.key.read_bytes(), self._files.cert.read_bytes())
        roots = self._files.client_ca.read_bytes() if self._files.client_ca else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def fetch(self) -> Any:
        """A new configuration when the files changed since the last one, else None."""
        with self._lock:
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return None
                config = self._config()
            except (OSError, ValueError) as exc:  # half-written by a rotation: next time
                logger.warning("TLS files not reloaded yet: %s", exc)
                return None
            self._stamp = stamp
            logger.info("TLS certificate reloaded from %s", self._files.cert)
            return config


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for a secure port, re-read when the certificate files change."""
    reloading = _Reloading(files)
    return grpc.dynamic_ssl_server_credentials(
        reloading.initial,
        reloading.fetch,
        require_client_authentication=files.client_ca is not None,
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials | None:
    """Credentials to call a TLS server (presenting this process's certificate when it has one);
    None when `files` name no CA (plaintext)."""
    if files.ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=files.key.read_bytes() if files.key else None,
        certificate_chain=files.cert.read_bytes() if files.cert else None,
    )


def aio_channel(
    addr: str,
    files: TlsFiles | None,
    options: list[tuple[str, Any]] | None = None,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `addr`: TLS when `files` name a CA, else plaintext. A channel to
    one address behind a name (a pod of a headless Service) checks the server's certificate
    against `server_name`, the Service's name, rather than the address."""
    credentials = channel_credentials(files) if files is not None else None
    if credentials is None:
        return grpc.aio.insecure_channel(addr, options=options)
    if server_name:
        options = [*(options or []), ("grpc.ssl_target_name_override", server_name)]
    return grpc.aio.secure_channel(addr, credentials, options=options)


def channel(
    addr: str, files: TlsFiles | None, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A blocking channel to `addr` (CLI, tests): TLS when `files` name a CA."""
    credentials = channel_credentials(files) if files is not None else None
    if credentials is None:
        return grpc.insecure_channel(addr, options=options)
    return grpc.secure_channel(addr, credentials, options=options)


def transport_is_secure(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call came over TLS."""
    auth = context.auth_context()
    return auth.get("transport_security_type") == [b"ssl"]


# -- a throwaway PKI for the local cluster --------------------------------------------------------
@dataclass(frozen=True)
class LocalPki:
    """Files of a CA, a server certificate for the local hosts and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_files(self, mtls: bool) -> TlsFiles:
        """A service's material: its certificate, trust in the CA for the hops it calls, and
        (with `mtls`) the CA its clients' certificates must chain to."""
        return TlsFiles(self.server_cert, self.server_key, self.ca if mtls else None, ca=self.ca)

    def client_files(self, with_certificate: bool = True) -> TlsFiles:
        """A client's: trust in the CA and (for mTLS) its own certificate."""
        if not with_certificate:
            return TlsFiles(ca=self.ca)
        return TlsFiles(self.client_cert, self.client_key, ca=self.ca)


PKI_DAYS = 30


def local_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> LocalPki:
    """A CA and certificates for `hosts` under `directory`, made once (kept if present)."""
    pki = LocalPki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server-key.pem",
        directory / "client.pem",
        directory / "client-key.pem",
    )
    if all(p.is_file() for p in vars(pki).values()):
        return pki
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("fieldlens local CA"))
        .issuer_name(name("fieldlens local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=PKI_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        cn: str, usages: list[x509.ObjectIdentifier], key_path: Path, cert_path: Path
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=PKI_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_key(key, key_path)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    # A service is also a client of the services it calls (mTLS on the internal hops).
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    issue("fieldlens service", both, pki.server_key, pki.server_cert)
    issue("fieldlens client", [ExtendedKeyUsageOID.CLIENT_AUTH], pki.client_key, pki.client_cert)
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return pki
