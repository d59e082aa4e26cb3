"""Write credentials: named bearer tokens with scopes, and the one shared token before them.

Write RPCs present `authorization: Bearer <token>`. A token is either

- a named token of the tokens file (FIELDLENS_TOKENS_FILE): JSON lines, one token per line,
  `{"name": "alice", "scopes": ["learn"], "sha256": "<hex>", "created": "<UTC ISO time>"}`,
  with only the SHA-256 digest of the token at rest (tokens are 256 random bits, so a plain
  digest cannot be brute-forced). The router stats the file on each write call and reads it
  again when it changed, so adding a token or revoking one (removing its line) needs no
  restart. The name says who wrote what: it is recorded with every learned example and labels
  the write-RPC metrics. `fieldlens token add|revoke|list` manage the file.
- FIELDLENS_WRITE_TOKEN: the single token of earlier releases, with every scope, recorded as
  client `write-token`. The local cluster makes one on first start, keeps it in
  `<run dir>/write-token` (mode 0600) and hands it to the router; local clients (CLI, tests,
  bench) read it from there unless the variable is set.

Scopes: `learn` (Learn, LearnStream, Forget), `index` (IndexExemplars), `admin`
(SwitchModelSet). A missing or unknown token is UNAUTHENTICATED; a known one without the scope
is PERMISSION_DENIED, naming the scope.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fieldlens.common.errors import (
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

logger = logging.getLogger(__name__)

TOKEN_ENV = "FIELDLENS_WRITE_TOKEN"
TOKENS_FILE_ENV = "FIELDLENS_TOKENS_FILE"
Scope = Literal["learn", "index", "admin"]
SCOPES: tuple[Scope, ...] = ("learn", "index", "admin")
# The client name of FIELDLENS_WRITE_TOKEN; reserved, so no named token can pass for it.
SHARED_CLIENT = "write-token"
# Client names become metric label values and journal fields: short, plain, bounded.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"name", "scopes", "sha256", "created"})


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class NamedToken:
    """One client's credential as stored: its name, scopes and the token's SHA-256 digest."""

    name: str
    scopes: frozenset[str]
    sha256: str  # hex digest of the token's UTF-8 bytes
    created: str = ""  # UTC ISO time it was added (informational)

    def require(self, scope: Scope) -> None:
        """PermissionDenied, naming `scope`, unless this client holds it."""
        if scope not in self.scopes:
            held = ", ".join(s for s in SCOPES if s in self.scopes)
            raise PermissionDenied(
                f"this call needs the {scope!r} scope; client {self.name!r} has {held}"
            )

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "scopes": [s for s in SCOPES if s in self.scopes],
            "sha256": self.sha256,
            "created": self.created,
        }


def hash_token(token: str) -> str:
    """The hex SHA-256 digest the tokens file keeps of `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def parse_scopes(raw: str | Iterable[str]) -> frozenset[str]:
    """Scopes from "learn,index" (or a list of them); ValueError for an unknown one, or none."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    scopes = frozenset(s.strip() for s in items if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise ValueError(
            f"unknown scope {', '.join(map(repr, unknown))}; scopes are {', '.join(SCOPES)}"
        )
    if not scopes:
        raise ValueError(f"at least one scope is needed, of {', '.join(SCOPES)}")
    return scopes


def check_name(name: str) -> str:
    """`name` if it can name a client; ValueError otherwise."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"client name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    if name == SHARED_CLIENT:
        raise ValueError(f"client name {name!r} is reserved for {TOKEN_ENV}")
    return name


def parse_tokens(text: str, origin: str = "tokens file") -> list[NamedToken]:
    """The named tokens of a tokens file's text; TokensFileError naming `origin` and the line.

    Blank lines and lines starting with '#' are skipped; every other line is one JSON object
    with exactly the fields name, scopes, sha256 and (optionally) created. Names and tokens are
    unique.
    """
    tokens: list[NamedToken] = []
    names: set[str] = set()
    digests: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{origin}:{n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TokensFileError(f"{where}: not a JSON object ({exc.msg})") from None
        try:
            token = _token_of(raw)
        except ValueError as exc:
            raise TokensFileError(f"{where}: {exc}") from None
        if token.name in names:
            raise TokensFileError(f"{where}: client {token.name!r} is named twice")
        if token.sha256 in digests:
            raise TokensFileError(f"{where}: the same token is stored under two names")
        names.add(token.name)
        digests.add(token.sha256)
        tokens.append(token)
    return tokens


def _token_of(raw: object) -> NamedToken:
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if "token" in raw:
        raise ValueError("holds a token in clear; store only its sha256 (`fieldlens token add`)")
    missing = sorted({"name", "scopes", "sha256"} - set(raw))
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field {', '.join(map(repr, unknown))}")
    name, scopes, digest, created = raw["name"], raw["scopes"], raw["sha256"], raw.get("created")
    if not isinstance(name, str):
        raise ValueError("name must be a string")
    check_name(name)
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValueError(f"client {name!r}: scopes must be a list of strings")
    try:
        scope_set = parse_scopes(scopes)
    except ValueError as exc:
        raise ValueError(f"client {name!r}: {exc}") from None
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ValueError(f"client {name!r}: sha256 must be 64 lower-case hex digits")
    if created is not None and not isinstance(created, str):
        raise ValueError(f"client {name!r}: created must be a string")
    return NamedToken(name, scope_set, digest, created or "")


def read_tokens(path: Path) -> list[NamedToken]:
    """The named tokens of the file at `path`; none when there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensFileError(f"{path}: cannot be read: {exc}") from None
    return parse_tokens(text, str(path))


def write_tokens(path: Path, tokens: Sequence[NamedToken]) -> None:
    """Replaces the file at `path` at once (owner-only), so a router never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(t.to_json(), separators=(",", ":")) + "\n" for t in tokens)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already unless something failed


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[None]:
    """Holds the tokens file's edit lock (an flock on `.<name>.lock` beside it): two
    `fieldlens token add` or `revoke` at once each see the other's change instead of one
    writing over it. Readers (the routers) need no lock: the file is replaced whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


def add_token(path: Path, name: str, scopes: Iterable[str]) -> str:
    """Adds client `name` with `scopes` to the file at `path` (made if missing); returns its
    token, which is not stored anywhere: the caller shows it once."""
    check_name(name)
    scope_set = parse_scopes(list(scopes))
    with _editing(path):
        tokens = read_tokens(path)
        if any(t.name == name for t in tokens):
            raise ValueError(f"client {name!r} exists already in {path}; revoke it first")
        token = new_token()
        created = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
        write_tokens(path, [*tokens, NamedToken(name, scope_set, hash_token(token), created)])
    return token


def revoke_token(path: Path, name: str) -> None:
    """Removes client `name` from the file at `path`; ValueError when it is not there."""
    with _editing(path):
        tokens = read_tokens(path)
        kept = [t for t in tokens if t.name != name]
        if len(kept) == len(tokens):
            raise ValueError(f"no client {name!r} in {path}")
        write_tokens(path, kept)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of a call's `authorization: Bearer <token>` header; Unauthenticated if none."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        raise Unauthenticated("write RPCs need an 'authorization: Bearer <token>' header")
    raw = values[0]
    scheme, _, given = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise Unauthenticated("invalid write credential")
    return given


class Credentials:
    """Who may write: the named tokens of a tokens file, read again when it changes, and the
    shared FIELDLENS_WRITE_TOKEN.

    A tokens file that is missing holds no tokens (a warning is logged). One that turns
    malformed while the router runs refuses every named token (UNAVAILABLE) until it is fixed,
    so a bad edit can never keep a revoked token alive; at start (`load`) it is an error.

    Args:
        tokens_file: The tokens file; None: no named tokens.
        write_token: The shared token with every scope; None: none.
    """

    def __init__(self, tokens_file: Path | None, write_token: str | None) -> None:
        self.tokens_file = tokens_file
        self._shared = (
            None
            if write_token is None
            else NamedToken(SHARED_CLIENT, frozenset(SCOPES), hash_token(write_token))
        )
        self._tokens: tuple[NamedToken, ...] = ()
        # (device, inode, size, mtime) of the file last read; None when it was missing. The
        # inode changes whenever `write_tokens` or a Kubernetes Secret update replaces it.
        self._seen: tuple[int, int, int, int] | None = None
        self._loaded = False
        self._problem: str | None = None  # why the file's tokens are refused right now

    @property
    def enabled(self) -> bool:
        """Whether any write can be authorised (a shared token or a tokens file)."""
        return self._shared is not None or self.tokens_file is not None

    def load(self) -> None:
        """Reads the tokens file now; TokensFileError when it is malformed (at start-up)."""
        self._refresh(strict=True)

    def _refresh(self, strict: bool = False) -> None:
        path = self.tokens_file
        if path is None:
            return
        try:
            st = path.stat()
            seen: tuple[int, int, int, int] | None = (
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
            )
        except FileNotFoundError:
            seen = None
        except OSError as exc:
            self._fail(f"{path}: cannot be read: {exc}", strict)
            return
        if self._loaded and seen == self._seen:
            return
        self._seen, self._loaded = seen, True
        if seen is None:
            logger.warning("no tokens file at %s: no named tokens", path)
            self._tokens, self._problem = (), None
            return
        try:
            tokens = read_tokens(path)
        except TokensFileError as exc:
            self._fail(str(exc), strict)
            return
        self._tokens, self._problem = tuple(tokens), None
        logger.info(
            "tokens file %s: %d named tokens (%s)",
            path,
            len(tokens),
            ", ".join(t.name for t in tokens) or "none",
        )

    def _fail(self, problem: str, strict: bool) -> None:
        if strict:
            raise TokensFileError(problem)
        if problem != self._problem:
            logger.error("%s; named tokens are refused until it is fixed", problem)
        self._tokens, self._problem = (), problem

    def identify(self, token: str) -> NamedToken | None:
        """The credential `token` is, if any (the tokens file re-read first if it changed).

        Digests are compared in constant time, every one of them: how long this takes says
        nothing about which stored token, if any, is close.
        """
        self._refresh()
        given = hash_token(token)
        found = None
        for candidate in (self._shared, *self._tokens):
            if candidate is not None and hmac.compare_digest(given, candidate.sha256):
                found = found or candidate
        return found

    def client_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The name of the client whose known token `metadata` carries; None without one.

        Never raises and checks no scope: it names callers (per-client limits, logs), it does
        not authorise them. Names cannot contain ':', so they never look like a peer address.
        """
        try:
            token = bearer_token(metadata)
        except Unauthenticated:
            return None
        found = self.identify(token)
        return None if found is None else found.name

    def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> NamedToken:
        """The client whose bearer token `metadata` carries.

        Raises:
            FailedPrecondition: Writes are disabled (neither a shared token nor a tokens file).
            Unauthenticated: No bearer token, or one nobody holds.
            Unavailable: The tokens file is malformed and the token is not the shared one.
        """
        if not self.enabled:
            raise FailedPrecondition(
                f"writes are disabled: this router has no write token configured ({TOKEN_ENV} "
                f"or {TOKENS_FILE_ENV})"
            )
        found = self.identify(bearer_token(metadata))
        if found is None:
            if self._problem is not None:
                raise Unavailable(
                    "the router cannot read its tokens file, so named tokens are refused until "
                    "it is fixed; retry later"
                )
            raise Unauthenticated("invalid write credential")
        return found

    def authorize(self, metadata: Iterable[tuple[str, str | bytes]] | None, scope: Scope) -> str:
        """The name of the client whose bearer token `metadata` carries, if it holds `scope`
        (PermissionDenied if not; see `caller` for the other errors)."""
        found = self.caller(metadata)
        found.require(scope)
        return found.name


def ensure_token(path: Path) -> str:
    """The token stored at `path`, created (random, owner-only) if there is none."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = new_token()
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
