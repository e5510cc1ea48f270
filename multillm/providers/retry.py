"""The one retry loop around a model call, and how a call that failed for good maps to an RpcStatus code.

Brief provider faults (429, 408, 409, 5xx, timeouts, connection resets) are retried
here with tenacity's `AsyncRetrying`; the openai SDK's own retries are off and message redelivery is
the workers' business, so there is exactly one loop per call. A provider's
`retry-after-ms` / `Retry-After` is honoured (capped at `max_wait`); otherwise the
wait is exponential with jitter. The loop never starts a wait that would end past
`budget_seconds`, and each try's timeout is cut to what is left of the budget.
"""

from __future__ import annotations

import email.utils
import functools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import aiohttp
import openai
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay

from multillm.config import RetryConfig
from multillm.errors import Code, ProviderError, describe
from multillm.redact import scrub

T = TypeVar("T")

log = structlog.get_logger(__name__)

_RETRYABLE_STATUSES = frozenset({408, 409, 429})
# The shortest try worth starting: no retry starts with less of the budget left.
_MIN_TRY_TIMEOUT = 0.05


def is_retryable(exc: BaseException) -> bool:
    """Whether another try may help: rate limits, timeouts, resets and server errors."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRYABLE_STATUSES or exc.status_code >= 500
    # aiohttp errors the SDK's aiohttp transport does not map (a malformed response) arrive raw.
    return isinstance(exc, openai.APIConnectionError | aiohttp.ClientError)  # includes APITimeoutError


def retry_after(exc: BaseException | None) -> float | None:
    """Seconds the provider asked us to wait (`retry-after-ms`, then `Retry-After`), if it did."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(float(ms) / 1000, 0.0)
        if (value := headers.get("retry-after")) is None:
            return None
        try:
            return max(float(value), 0.0)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max((when - datetime.now(UTC)).total_seconds(), 0.0)
    except (ValueError, TypeError):  # a malformed header is as good as none
        return None


def _waiter(policy: RetryConfig) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        asked = retry_after(state.outcome.exception() if state.outcome else None)
        if asked is not None:
            return min(asked, policy.max_wait)
        # "Equal jitter": at least half the exponential step, so concurrent callers spread out
        # without any of them retrying immediately.
        step = min(policy.max_wait, policy.initial_wait * 2.0 ** (state.attempt_number - 1))
        return step / 2 + random.uniform(0, step / 2)

    return wait


def _log_retry(describe: str, on_retry: Callable[[str], None] | None, state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
    log.warning(
        "provider.retry",
        model=describe,
        attempt=state.attempt_number,
        wait_s=round(state.upcoming_sleep, 3),
        status=status,
        error=type(exc).__name__,
    )
    if on_retry is not None:
        on_retry(str(status) if status is not None else type(exc).__name__)


def classify(exc: Exception) -> tuple[Code, str]:
    """The RpcStatus code and a description of an exception that ended a model call."""
    if isinstance(exc, ProviderError):
        return Code(exc.code), exc.message
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            code = Code.RESOURCE_EXHAUSTED
        elif status in _RETRYABLE_STATUSES or status >= 500:
            code = Code.UNAVAILABLE
        elif status == 401:
            code = Code.UNAUTHENTICATED
        elif status == 403:
            code = Code.PERMISSION_DENIED
        elif 400 <= status < 500:
            code = Code.INVALID_ARGUMENT
        else:
            code = Code.INTERNAL
        return code, exc.message
    if isinstance(exc, openai.APIConnectionError):
        if (refused := _cannot_connect(exc)) is not None:
            # The SDK's transport reports a refused connection as a connect timeout.
            return Code.UNAVAILABLE, refused
        # Only the cause's kind: its text may quote the request's headers, key included.
        cause = exc.__cause__
        detail = f" ({type(cause).__name__})" if cause is not None else ""
        if isinstance(cause, OSError) and cause.strerror:
            detail = f" ({type(cause).__name__}: {cause.strerror})"
        return Code.UNAVAILABLE, exc.message + detail
    if isinstance(exc, aiohttp.ClientError):
        # Only the kind: an aiohttp message may quote the URL (which may hold a key in a query).
        detail = _cannot_connect(exc) or f"the provider's connection failed ({type(exc).__name__})"
        return Code.UNAVAILABLE, detail
    return Code.INTERNAL, describe(exc)


def _cannot_connect(exc: BaseException) -> str | None:
    """'cannot connect to host H:P (why)' if aiohttp could not connect, somewhere in `exc`'s causes.

    Only the host, the port and the socket's error are quoted: never the URL, whose path or
    query may hold a key, nor the request's headers.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, aiohttp.ClientConnectorError):
            os_error = current.os_error
            reason = (os_error.strerror or str(os_error)) if isinstance(os_error, OSError) else ""
            why = f"{type(os_error).__name__}: {reason}" if reason else type(current).__name__
            return f"cannot connect to host {current.host}:{current.port} ({why})"
        current = current.__cause__ or current.__context__
    return None


async def call_with_retry(
    attempt: Callable[[float], Awaitable[T]],
    policy: RetryConfig,
    *,
    timeout: float,
    describe: str,
    secrets: Sequence[str | None] = (),
    on_retry: Callable[[str], None] | None = None,
) -> tuple[T, int, float]:
    """Await `attempt(timeout_of_this_try)` until it succeeds, fails for good, or the policy stops it.

    Waits between tries are `asyncio.sleep`s: the event loop serves other calls meanwhile.

    Args:
        attempt: one try; raises the openai SDK's errors (or `ProviderError`) on failure.
        policy: attempts, waits and the total time budget.
        timeout: the longest a single try may take (cut to what is left of the budget).
        describe: names the call in error messages, e.g. `mock/echo`.
        secrets: api keys to scrub from every error message.
        on_retry: told before each retry why it is made (the HTTP status, or the error's type).

    Returns:
        The result, the number of tries made, and the wall time in milliseconds.

    Raises:
        ProviderError: with the code of the last failure, the number of tries and the wall time.
    """
    started = time.monotonic()
    retrying = AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        wait=_waiter(policy),
        # No retry starts unless a useful try still fits in the budget after its wait.
        stop=stop_after_attempt(policy.max_attempts)
        | stop_before_delay(max(policy.budget_seconds - _MIN_TRY_TIMEOUT, 0.0)),
        before_sleep=functools.partial(_log_retry, describe, on_retry),
        reraise=True,
    )
    tries = 0

    async def one_try() -> T:
        nonlocal tries
        tries += 1
        left = policy.budget_seconds - (time.monotonic() - started)
        return await attempt(max(min(timeout, left), _MIN_TRY_TIMEOUT))

    try:
        result: T = await retrying(one_try)
        return result, tries, (time.monotonic() - started) * 1000
    except Exception as exc:
        # Without its traceback: that holds this frame, which holds `failure`, a reference cycle.
        failure = exc.with_traceback(None)
    finally:
        # The retrying object keeps its last step's actions, its own bound methods among them:
        # a reference cycle in every call. Left to the cyclic GC, 40 objects a call piled up
        # in its older generations, and at 512 calls in flight one collection of them stopped
        # the worker for 1.2 s a minute. Cleared, they go on return.
        retrying.iter_state.reset()
    # Raised outside the `except` so that no chained exception (whose text may hold
    # an api key) travels with it into tracebacks and logs.
    latency_ms = (time.monotonic() - started) * 1000
    # Here only from the `except`: the `try` returns otherwise, and tenacity always makes a first try.
    code, detail = classify(failure)
    suffix = f" (after {tries} attempts)" if tries > 1 else ""
    message = scrub(f"{describe}: {detail}{suffix}", secrets)
    raise ProviderError(code, message, attempts=tries, latency_ms=latency_ms)
