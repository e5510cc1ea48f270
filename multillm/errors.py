"""One error tree. Errors a caller can act on carry the RpcStatus code of the reply."""

from __future__ import annotations

from enum import IntEnum

from multillm.schemas import ErrorInfo, RpcStatus


class Code(IntEnum):
    """gRPC status codes used in `RpcStatus` replies and in records' `error_code`."""

    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


def code_name(code: object) -> str:
    """`UNAVAILABLE` for 14; the value itself, as text, for anything that is not a `Code`."""
    if isinstance(code, int) and code in Code._value2member_map_:
        return Code(code).name
    return str(code)


class MultiLLMError(Exception):
    """Base of every error this package raises on purpose."""


def describe(exc: BaseException) -> str:
    """`Type: message` for a log line or an error message; the type alone when the message is empty
    (pika's connection errors often carry none, and a bare `AMQPConnectionError: ` says nothing)."""
    text = str(exc) or ", ".join(repr(arg) for arg in exc.args)  # pika keeps its story in repr()
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ConfigError(MultiLLMError):
    """The configuration file or environment is invalid; the message names the key."""


class CommandError(MultiLLMError):
    """A `multillm` command failed in a way the user can act on; printed as one line without a traceback."""


class BrokerUnavailable(MultiLLMError, ConnectionError):
    """No broker answered at the configured URL when the client started."""


class RequestTimeout(MultiLLMError, TimeoutError):
    """No reply came before the caller's timeout."""


class RpcError(MultiLLMError):
    """An error with an `RpcStatus` code: in a caller, the pipeline's answer instead of a completion
    (a subclass per code); in a worker, as `ProviderError`, a model call that failed for good."""

    code: int
    message: str

    def __init__(self, code: int, message: str, details: list[ErrorInfo] | None = None) -> None:
        super().__init__(f"[{code_name(code)}] {message}")
        self.code = code
        self.message = message
        self.details = details or []

    @classmethod
    def from_status(cls, status: RpcStatus) -> RpcError:
        subclass = _BY_CODE.get(status.code, RpcError)
        return subclass(status.code, status.message, status.details)

    def to_status(self) -> RpcStatus:
        return RpcStatus(code=self.code, message=self.message, details=self.details)

    @property
    def log_id(self) -> str | None:
        """The log id of the primary's error record, when one was written."""
        return self.to_status().log_id


class ProviderError(RpcError):
    """A model call that failed for good, in a worker; `message` is safe to log, store and reply with,
    and becomes the error record's and, for the primary, the reply's.

    Attributes:
        code: the RpcStatus code (`Code`).
        message: what went wrong, with every api key scrubbed out.
        attempts: how many tries were made (0 when none could be made).
        latency_ms: wall time of all tries and waits.
    """

    def __init__(self, code: int, message: str, *, attempts: int = 0, latency_ms: float = 0.0) -> None:
        super().__init__(code, message)
        self.attempts = attempts
        self.latency_ms = latency_ms

    @property
    def retryable(self) -> bool:
        """The failure is transient (rate limit, provider down): the same call may succeed later."""
        return self.code in (Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE)


class ConnectionLost(MultiLLMError, ConnectionError):
    """A worker gave its broker connection up (the broker cancelled its consumer, or settling failed):
    it reconnects, and the broker redelivers what was not settled."""


class InvalidArgument(RpcError):
    """3: the request is invalid (bad JSON, an unknown provider, too large)."""


class DeadlineExceeded(RpcError):
    """4: the model did not answer before the request's deadline."""


class NotFound(RpcError):
    """5: not in replies today (a provider's 404 is 3); dead letters of replies whose queue did not exist carry it."""


class PermissionDenied(RpcError):
    """7: the provider refused access with the key it was given."""


class ResourceExhausted(RpcError):
    """8: the provider is rate limiting, even after retries."""


class Internal(RpcError):
    """13: a fault in the pipeline itself (an undecodable reply, a bug)."""


class Unavailable(RpcError):
    """14: the provider is down, or no worker serves the requests."""


class Unauthenticated(RpcError):
    """16: the provider refused the key (a missing or wrong api key)."""


_BY_CODE: dict[int, type[RpcError]] = {
    Code.INVALID_ARGUMENT: InvalidArgument,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.NOT_FOUND: NotFound,
    Code.PERMISSION_DENIED: PermissionDenied,
    Code.RESOURCE_EXHAUSTED: ResourceExhausted,
    Code.INTERNAL: Internal,
    Code.UNAVAILABLE: Unavailable,
    Code.UNAUTHENTICATED: Unauthenticated,
}
