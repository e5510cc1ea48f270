"""Driving a mock over HTTP, e.g. one that runs in another process."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Sequence
from typing import cast

from multillm.mock_llm.protocol import Fault, MockCall, _calls_decoder, _encoder


class MockControl:
    """Drive a mock over HTTP (stdlib only), e.g. one that runs in another process.

    Args:
        base_url: the mock's URL, with or without the trailing `/v1`.
        timeout: seconds for each control request.
    """

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return cast(bytes, response.read())

    def set_fault(
        self,
        model: str,
        *,
        statuses: Sequence[int] = (),
        always: int | None = None,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        latency_ms: float | None = None,
        drop_connection: bool = False,
        echo_auth: bool = False,
        error_rate: float = 0.0,
        error_statuses: Sequence[int] = (500,),
        seed: int = 0,
        token_delay_ms: float | None = None,
        cut_after_tokens: int | None = None,
        cut_streams: int | None = None,
    ) -> None:
        """Replace the fault of `model` (the provider-side name, or `*`); see `Fault`."""
        fault = Fault(
            model=model,
            statuses=list(statuses),
            always=always,
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
            latency_ms=latency_ms,
            drop_connection=drop_connection,
            echo_auth=echo_auth,
            error_rate=error_rate,
            error_statuses=list(error_statuses),
            seed=seed,
            token_delay_ms=token_delay_ms,
            cut_after_tokens=cut_after_tokens,
            cut_streams=cut_streams,
        )
        self._request("POST", "/_mock/faults", _encoder.encode(fault))

    def clear_faults(self) -> None:
        """Every model answers normally again."""
        self._request("DELETE", "/_mock/faults")

    def calls(self) -> list[MockCall]:
        """Every call served since the last `clear_calls()`, oldest first."""
        return _calls_decoder.decode(self._request("GET", "/_mock/calls"))

    def clear_calls(self) -> None:
        """Forget the calls served so far."""
        self._request("DELETE", "/_mock/calls")

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the mock answers, e.g. after starting it in another process.

        Raises:
            TimeoutError: it did not answer within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.calls()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mock LLM at {self.base_url} not ready after {timeout}s") from None
                time.sleep(0.05)
