"""Scoped write credentials: the tokens file (hashes at rest, reloaded when it changes, revoked
by removing a line), the scope each write RPC needs as a client sees it, who wrote what in the
journal, and `fieldlens token`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc import aio
from prometheus_client import CollectorRegistry

from fieldlens import cli
from fieldlens.common import credentials
from fieldlens.common.credentials import (
    SHARED_CLIENT,
    Credentials,
    NamedToken,
    TokensFileError,
    add_token,
    bearer,
    hash_token,
    parse_tokens,
    read_tokens,
    revoke_token,
    write_tokens,
)
from fieldlens.common.errors import (
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from fieldlens.common.interceptors import default_interceptors
from fieldlens.common.knowledge import ForgetRecord, KnowledgeJournal, LearnedExample
from fieldlens.common.settings import RouterSettings
from fieldlens.common.telemetry import get_metrics
from fieldlens.router.servicer import WRITE_SCOPES, RouterServicer
from fieldlens.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def _line(name: str, scopes: list[str], token: str = "", **extra: object) -> str:
    digest = hash_token(token or f"token-of-{name}")
    return json.dumps({"name": name, "scopes": scopes, "sha256": digest, **extra}) + "\n"


def _auth(creds: Credentials, token: str | None, scope: credentials.Scope) -> str:
    return creds.authorize(bearer(token) if token is not None else (), scope)


# -- the file ---------------------------------------------------------------------------------
def test_add_stores_only_the_hash_owner_only_and_list_reads_it_back(tmp_path: Path):
    path = tmp_path / "secrets" / "tokens.jsonl"
    token = add_token(path, "alice", ["learn", "index"])
    assert len(token) >= 40
    text = path.read_text()
    assert token not in text and hash_token(token) in text
    assert path.stat().st_mode & 0o077 == 0
    (alice,) = read_tokens(path)
    assert (alice.name, alice.scopes, alice.sha256) == (
        "alice",
        frozenset({"learn", "index"}),
        hash_token(token),
    )
    assert alice.created.endswith("+00:00")
    with pytest.raises(ValueError, match="'alice' exists already"):
        add_token(path, "alice", ["learn"])
    bob = add_token(path, "bob", ["admin"])
    assert bob != token and [t.name for t in read_tokens(path)] == ["alice", "bob"]
    revoke_token(path, "alice")
    assert [t.name for t in read_tokens(path)] == ["bob"]
    with pytest.raises(ValueError, match="no client 'alice'"):
        revoke_token(path, "alice")


@pytest.mark.parametrize(
    ("name", "scopes", "match"),
    [
        ("alice", ["learn", "write"], "unknown scope 'write'"),
        ("alice", [], "at least one scope"),
        ("bad name", ["learn"], "must be 1-64 letters"),
        ("x" * 65, ["learn"], "must be 1-64 letters"),
        (SHARED_CLIENT, ["learn"], "reserved for FIELDLENS_WRITE_TOKEN"),
    ],
)
def test_add_refuses_bad_names_and_scopes(tmp_path: Path, name, scopes, match):
    with pytest.raises(ValueError, match=match):
        add_token(tmp_path / "tokens.jsonl", name, scopes)
    assert not (tmp_path / "tokens.jsonl").exists()


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json\n", r"f:4: not a JSON object"),
        ('["a list"]\n', r"f:4: not a JSON object"),
        ('{"name": "c", "scopes": ["learn"]}\n', r"f:4: missing sha256"),
        (_line("c", ["learn"], note="x"), r"f:4: unknown field 'note'"),
        (
            _line("c", ["learn"], token="s3cret")[:-2] + ', "token": "s3cret"}\n',
            r"f:4: holds a token",
        ),
        (_line("c", ["learn", "root"]), r"f:4: client 'c': unknown scope 'root'"),
        (_line("c", []), r"f:4: client 'c': at least one scope"),
        (_line("c", "learn"), r"f:4: client 'c': scopes must be a list"),  # type: ignore[arg-type]
        (
            '{"name": "c", "scopes": ["learn"], "sha256": "ABC"}\n',
            r"f:4: client 'c': sha256 must be 64 lower-case hex digits",
        ),
        (_line("a", ["admin"]), r"f:4: client 'a' is named twice"),
        (_line("c", ["admin"], token="token-of-a"), r"f:4: the same token is stored under two"),
        (_line(SHARED_CLIENT, ["learn"]), r"f:4: client name 'write-token' is reserved"),
    ],
)
def test_a_malformed_file_is_a_clear_error_naming_the_line(line: str, match: str):
    text = _line("a", ["learn"]) + "# a comment, then a blank line\n\n" + line
    with pytest.raises(TokensFileError, match=match):
        parse_tokens(text, "f")


def test_comments_and_blank_lines_are_skipped():
    tokens = parse_tokens("# clients\n\n" + _line("a", ["learn"]) + "   \n" + _line("b", ["index"]))
    assert [t.name for t in tokens] == ["a", "b"]


# -- Credentials --------------------------------------------------------------------------------
@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens.jsonl"


def test_scopes_decide_unknown_and_missing_tokens_are_unauthenticated(tokens_file: Path):
    learner = add_token(tokens_file, "learner", ["learn"])
    indexer = add_token(tokens_file, "indexer", ["index"])
    ops = add_token(tokens_file, "ops", ["learn", "index", "admin"])
    creds = Credentials(tokens_file, None)
    creds.load()
    assert _auth(creds, learner, "learn") == "learner"
    assert _auth(creds, indexer, "index") == "indexer"
    assert [_auth(creds, ops, s) for s in credentials.SCOPES] == ["ops"] * 3
    with pytest.raises(
        PermissionDenied, match="needs the 'admin' scope; client 'learner' has learn"
    ):
        _auth(creds, learner, "admin")
    with pytest.raises(PermissionDenied, match="needs the 'learn' scope; client 'indexer'"):
        _auth(creds, indexer, "learn")
    for token in ("not-a-token", learner[:-1], hash_token(learner)):
        with pytest.raises(Unauthenticated, match="invalid write credential"):
            _auth(creds, token, "learn")
    with pytest.raises(Unauthenticated, match="need an 'authorization: Bearer <token>' header"):
        _auth(creds, None, "learn")
    with pytest.raises(Unauthenticated, match="invalid write credential"):
        creds.authorize((("authorization", f"Basic {learner}"),), "learn")


def test_client_of_names_callers_without_authorising_them(tokens_file: Path):
    alice = add_token(tokens_file, "alice", ["index"])
    creds = Credentials(tokens_file, "s" * 32)
    assert creds.client_of(bearer(alice)) == "alice"  # whatever the scope
    assert creds.client_of(bearer("s" * 32)) == SHARED_CLIENT
    assert creds.client_of(bearer("unknown")) is None
    assert creds.client_of(()) is None and creds.client_of(None) is None


def test_the_shared_token_keeps_every_scope_beside_named_ones(tokens_file: Path):
    shared = "s" * 32
    alice = add_token(tokens_file, "alice", ["learn"])
    creds = Credentials(tokens_file, shared)
    creds.load()
    assert [_auth(creds, shared, s) for s in credentials.SCOPES] == [SHARED_CLIENT] * 3
    assert _auth(creds, alice, "learn") == "alice"
    only_shared = Credentials(None, shared)
    assert _auth(only_shared, shared, "admin") == SHARED_CLIENT
    with pytest.raises(Unauthenticated):
        _auth(only_shared, alice, "learn")
    with pytest.raises(FailedPrecondition, match="writes are disabled"):
        _auth(Credentials(None, None), shared, "learn")


def test_adding_and_revoking_take_effect_on_the_next_call_without_a_restart(tokens_file: Path):
    alice = add_token(tokens_file, "alice", ["learn"])
    creds = Credentials(tokens_file, None)
    creds.load()
    assert _auth(creds, alice, "learn") == "alice"
    bob = add_token(tokens_file, "bob", ["learn"])
    assert _auth(creds, bob, "learn") == "bob"  # added while running
    revoke_token(tokens_file, "alice")
    with pytest.raises(Unauthenticated):
        _auth(creds, alice, "learn")
    assert _auth(creds, bob, "learn") == "bob"


def test_an_edit_in_place_is_seen(tokens_file: Path):
    alice = add_token(tokens_file, "alice", ["learn"])
    creds = Credentials(tokens_file, None)
    creds.load()
    with pytest.raises(PermissionDenied):
        _auth(creds, alice, "admin")
    # An editor writing the same file (same inode): the size and modification time change.
    stat = tokens_file.stat()
    tokens_file.write_text(_line("alice", ["learn", "admin"], token=alice))
    os.utime(tokens_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert _auth(creds, alice, "admin") == "alice"


def test_a_missing_file_holds_no_tokens_until_it_appears(tokens_file: Path):
    shared = "s" * 32
    creds = Credentials(tokens_file, shared)
    creds.load()
    assert creds.enabled and _auth(creds, shared, "learn") == SHARED_CLIENT
    alice = add_token(tokens_file, "alice", ["learn"])
    assert _auth(creds, alice, "learn") == "alice"
    tokens_file.unlink()  # every named token goes with the file
    with pytest.raises(Unauthenticated):
        _auth(creds, alice, "learn")
    assert Credentials(tokens_file, None).enabled  # a file is configured: writes are checked


def test_malformed_at_start_fails_and_while_running_refuses_named_tokens(tokens_file: Path):
    tokens_file.write_text("{oops\n")
    with pytest.raises(TokensFileError, match=r"tokens.jsonl:1: not a JSON object"):
        Credentials(tokens_file, None).load()

    shared = "s" * 32
    write_tokens(tokens_file, [])
    alice = add_token(tokens_file, "alice", ["learn"])
    creds = Credentials(tokens_file, shared)
    creds.load()
    good = tokens_file.read_text()
    tokens_file.write_text(good + "{oops\n")  # a bad edit must not keep old tokens alive
    with pytest.raises(Unavailable, match="cannot read its tokens file"):
        _auth(creds, alice, "learn")
    assert _auth(creds, shared, "learn") == SHARED_CLIENT
    write_tokens(tokens_file, parse_tokens(good))
    assert _auth(creds, alice, "learn") == "alice"


def test_settings_name_the_tokens_file(tmp_path: Path):
    assert RouterSettings.from_env({}).tokens_file is None
    assert RouterSettings.from_env({"FIELDLENS_TOKENS_FILE": ""}).tokens_file is None
    path = tmp_path / "absent.jsonl"  # may not exist yet: it holds no tokens until it does
    assert RouterSettings.from_env({"FIELDLENS_TOKENS_FILE": str(path)}).tokens_file == path


# -- the scope of every write RPC, as a client sees it ---------------------------------------------
@asynccontextmanager
async def _router(
    creds: Credentials, allow_plaintext_tokens: bool = True
) -> AsyncIterator[tuple[router_pb2_grpc.RouterStub, object]]:
    """A real aio server with the production interceptor around a RouterServicer whose plane
    cannot learn: a call that passes the credential check then fails FAILED_PRECONDITION (or
    INVALID_ARGUMENT), after the check."""
    metrics = get_metrics(CollectorRegistry())
    servicer = RouterServicer(
        SimpleNamespace(learner=None, metrics=metrics),  # type: ignore[arg-type]
        creds,
        allow_plaintext_tokens,
    )
    server = aio.server(interceptors=default_interceptors(metrics))
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield router_pb2_grpc.RouterStub(channel), metrics
    finally:
        await server.stop(None)


async def _requests(request: object) -> AsyncIterator[object]:
    yield request


def _calls(stub: router_pb2_grpc.RouterStub) -> dict[str, object]:
    """Each write RPC, called with metadata; the fields are valid up to the credential check."""
    return {
        "Learn": lambda md: stub.Learn(router_pb2.LearnRequest(taxon_id="n1"), metadata=md),
        "LearnStream": lambda md: stub.LearnStream(
            _requests(router_pb2.LearnRequest(taxon_id="n1")), metadata=md
        ),
        "Forget": lambda md: stub.Forget(router_pb2.ForgetRequest(taxon_id="x"), metadata=md),
        "IndexExemplars": lambda md: stub.IndexExemplars(
            _requests(router_pb2.IndexExemplarsRequest(label="n1")), metadata=md
        ),
        "SwitchModelSet": lambda md: stub.SwitchModelSet(
            router_pb2.SwitchModelSetRequest(), metadata=md
        ),
        "SetRollout": lambda md: stub.SetRollout(router_pb2.SetRolloutRequest(), metadata=md),
        "PromoteCandidate": lambda md: stub.PromoteCandidate(
            router_pb2.PromoteCandidateRequest(), metadata=md
        ),
        "AbortCandidate": lambda md: stub.AbortCandidate(
            router_pb2.AbortCandidateRequest(), metadata=md
        ),
    }


def test_every_write_rpc_needs_its_scope(tokens_file: Path):
    assert WRITE_SCOPES == {
        "Learn": "learn",
        "LearnStream": "learn",
        "Forget": "learn",
        "IndexExemplars": "index",
        "SwitchModelSet": "admin",
        "SetRollout": "admin",
        "PromoteCandidate": "admin",
        "AbortCandidate": "admin",
    }
    holders = {s: add_token(tokens_file, f"only-{s}", [s]) for s in credentials.SCOPES}
    creds = Credentials(tokens_file, None)
    creds.load()

    async def body() -> None:
        async with _router(creds) as (stub, metrics):
            for method, call in _calls(stub).items():
                needed = WRITE_SCOPES[method]
                for scope, token in holders.items():
                    with pytest.raises(aio.AioRpcError) as err:
                        await call(bearer(token))  # type: ignore[operator]
                    if scope == needed:  # past the check: the plane cannot learn or switch
                        assert err.value.code() in (
                            grpc.StatusCode.FAILED_PRECONDITION,
                            grpc.StatusCode.INVALID_ARGUMENT,
                        ), (method, err.value.details())
                    else:
                        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
                        assert f"needs the '{needed}' scope" in err.value.details()
                        assert f"client 'only-{scope}'" in err.value.details()
                for metadata in ((), bearer("nobody-has-this-token")):
                    with pytest.raises(aio.AioRpcError) as err:
                        await call(metadata)  # type: ignore[operator]
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            # Write calls are counted by client (names from the file; "" unauthenticated).
            counts = {
                (s.labels["method"], s.labels["client"], s.labels["code"]): s.value
                for s in metrics.write_requests.collect()[0].samples
                if s.name.endswith("_total")
            }
            assert counts[("SwitchModelSet", "only-learn", "PERMISSION_DENIED")] == 1
            assert counts[("SwitchModelSet", "only-admin", "INVALID_ARGUMENT")] == 1
            assert counts[("Learn", "only-learn", "FAILED_PRECONDITION")] == 1
            assert counts[("IndexExemplars", "", "UNAUTHENTICATED")] == 2
            assert {c for _, c, _ in counts} == {"", *(f"only-{s}" for s in credentials.SCOPES)}

    asyncio.run(body())


def test_a_revoked_token_fails_its_next_call_while_another_still_works(tokens_file: Path):
    gone = add_token(tokens_file, "gone", ["admin"])
    kept = add_token(tokens_file, "kept", ["admin"])
    creds = Credentials(tokens_file, None)
    creds.load()

    async def body() -> None:
        async with _router(creds) as (stub, _):
            switch = _calls(stub)["SwitchModelSet"]
            for token in (gone, kept):
                with pytest.raises(aio.AioRpcError) as err:
                    await switch(bearer(token))  # type: ignore[operator]
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # past the check
            revoke_token(tokens_file, "gone")
            with pytest.raises(aio.AioRpcError) as err:
                await switch(bearer(gone))  # type: ignore[operator]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(aio.AioRpcError) as err:
                await switch(bearer(kept))  # type: ignore[operator]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(body())


# -- who wrote what ---------------------------------------------------------------------------
def test_journal_records_keep_the_client(tmp_path: Path):
    journal = KnowledgeJournal(tmp_path / "router.jsonl", "ms-1", "emb-1")
    vector = np.ones(4, dtype=np.float32)
    journal.append(
        [
            LearnedExample("e1", "n1", vector, source="cli", client="alice"),
            LearnedExample("e2", "n1", vector),  # before names were kept
            ForgetRecord(("e1",), client="ops"),
        ]
    )
    lines = [json.loads(line) for line in (tmp_path / "router.jsonl").read_text().splitlines()]
    assert lines[1]["client"] == "alice" and "client" not in lines[2]
    assert lines[3] == {"forget": ["e1"], "taxon_id": "", "client": "ops"}
    first, second, forget = journal.records()
    assert isinstance(first, LearnedExample) and first.client == "alice"
    assert isinstance(second, LearnedExample) and second.client == ""
    assert forget == ForgetRecord(("e1",), "", "ops")


# -- fieldlens token ----------------------------------------------------------------------------
def test_token_commands_add_list_and_revoke(tmp_path: Path, monkeypatch, capsys):
    path = tmp_path / "tokens.jsonl"
    monkeypatch.setenv(credentials.TOKENS_FILE_ENV, str(path))
    assert cli.main(["token", "add", "alice", "--scopes", "learn,index"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    (alice,) = read_tokens(path)
    assert alice == NamedToken(
        "alice", frozenset({"learn", "index"}), hash_token(token), alice.created
    )
    other = tmp_path / "other.jsonl"
    assert cli.main(["token", "add", "bob", "--scopes", "admin", "--file", str(other)]) == 0
    assert [t.name for t in read_tokens(other)] == ["bob"] and len(read_tokens(path)) == 1
    capsys.readouterr()
    assert cli.main(["token", "list"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "learn,index" in listed and token not in listed
    assert cli.main(["token", "add", "carol", "--scopes", "learn,root"]) == 1
    assert "unknown scope 'root'" in capsys.readouterr().out
    assert cli.main(["token", "revoke", "alice"]) == 0
    assert read_tokens(path) == []
    assert cli.main(["token", "revoke", "alice"]) == 1
    assert "no client 'alice'" in capsys.readouterr().out


def test_a_token_over_plaintext_is_refused_unless_allowed(tokens_file: Path):
    """The router's default (FIELDLENS_ALLOW_PLAINTEXT_TOKENS unset): a bearer token sent in
    clear is refused before it is even looked at; over TLS (tests/unit/test_tls.py, and the
    whole cluster in tests/e2e/test_tls.py) it is checked as usual."""
    token = add_token(tokens_file, "alice", ["learn"])
    creds = Credentials(tokens_file, None)
    creds.load()

    async def body() -> None:
        async with _router(creds, allow_plaintext_tokens=False) as (stub, _):
            with pytest.raises(aio.AioRpcError) as err:
                await _calls(stub)["Learn"](bearer(token))  # type: ignore[operator]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "refused over plaintext" in err.value.details()
        async with _router(creds, allow_plaintext_tokens=True) as (stub, _):
            with pytest.raises(aio.AioRpcError) as err:
                await _calls(stub)["Learn"](bearer(token))  # type: ignore[operator]
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # past the check

    asyncio.run(body())


def test_concurrent_adds_and_revokes_lose_no_edit(tmp_path: Path):
    """`fieldlens token add` run twice at once (two operators, a script): each edit sees the
    others' instead of writing over them. Separate processes, as the commands are."""
    path = tmp_path / "tokens.jsonl"
    add_token(path, "keep", ["learn"])
    add_token(path, "gone", ["learn"])
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fieldlens.common.credentials import add_token, revoke_token\n"
        "path, name = Path(sys.argv[1]), sys.argv[2]\n"
        "if name == 'gone':\n"
        "    revoke_token(path, name)\n"
        "else:\n"
        "    for i in range(5):\n"
        "        add_token(path, f'{name}-{i}', ['learn'])\n"
    )
    names = [f"client{i}" for i in range(6)]
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), name]) for name in [*names, "gone"]
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(procs)
    expected = {"keep"} | {f"{n}-{i}" for n in names for i in range(5)}
    assert {t.name for t in read_tokens(path)} == expected
