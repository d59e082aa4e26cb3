"""The write credential: a bearer token that write RPCs (Learn, IndexExemplars) must present.

In production it comes from a Kubernetes Secret as FIELDLENS_WRITE_TOKEN. The local cluster
makes one on first start, keeps it in `<run dir>/write-token` (mode 0600) and hands it to the
router; local clients (CLI, tests, bench) read it from there unless the variable is set.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_ENV = "FIELDLENS_WRITE_TOKEN"


def ensure_token(path: Path) -> str:
    """The token stored at `path`, created (random, owner-only) if there is none."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def client_token(path: Path) -> str:
    """What a local client sends: FIELDLENS_WRITE_TOKEN if set, else the local cluster's."""
    return os.environ.get(TOKEN_ENV) or ensure_token(path)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying the token."""
    return (("authorization", f"Bearer {token}"),)
