"""Typed domain errors, each mapped to one gRPC status code by ExceptionToStatusInterceptor."""

from __future__ import annotations

import grpc

# Trailing metadata keys of a retry hint, milliseconds the client should wait before retrying:
# ours, for any client to read, and gRPC's own, which a client whose service config has a
# retryPolicy for the status code honours by itself (gRFC A6 "server pushback").
RETRY_AFTER_KEY = "retry-after-ms"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class FieldlensError(Exception):
    """Base of all fieldlens domain errors; `code` is the gRPC status the client receives.

    Args:
        message: Text sent to the client as the status details, so it must not leak secrets
            or internals.
        retry_after_ms: A retry hint, sent as trailing metadata `retry-after-ms` and
            `grpc-retry-pushback-ms`; None = none.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "", *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message or self.default_message()
        self.retry_after_ms = retry_after_ms

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """What the status carries besides code and message: the retry hint, if any."""
        if self.retry_after_ms is None:
            return ()
        ms = str(self.retry_after_ms)
        return ((RETRY_AFTER_KEY, ms), (RETRY_PUSHBACK_KEY, ms))

    @classmethod
    def default_message(cls) -> str:
        """Fallback details when none were given: the status code's own name."""
        return str(cls.code.value[1])

    def __str__(self) -> str:
        return self.message


class InvalidInput(FieldlensError):
    """The request itself is wrong (undecodable image, unknown label, bad argument)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(FieldlensError):
    """The request exceeds a limit (image bytes, pixels) or the server is out of capacity."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(FieldlensError):
    """A named entity (taxon, category, model) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unavailable(FieldlensError):
    """A dependency the request cannot do without is down; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(FieldlensError):
    """The caller did not prove who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FieldlensError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(FieldlensError):
    """This service does not offer the operation (e.g. Learn on a specialist)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class FailedPrecondition(FieldlensError):
    """The system is not in a state to do this (e.g. model-set or embedding version mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(FieldlensError):
    """A required stage ran past its time budget."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
