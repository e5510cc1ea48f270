"""An OpenAI-compatible chat server for the demo and the tests, with faults driven over HTTP.

`POST /v1/chat/completions` answers deterministically: the text depends only on the
model and the messages, so runs can be compared. Faults are set per model (the
provider-side name, `echo` for `mock/echo`, or `*` for every model without its own)
through `/_mock/faults`, so a test can drive a mock that runs in another process;
`/_mock/calls` lists what was served. Status 0 in a fault means "close the socket
without answering".

Threads: one serves the listening socket; each connection gets a daemon thread
(`ThreadingHTTPServer`). The fault table and the call log are shared by all of them
under one lock.
"""

from __future__ import annotations

from multillm.mock_llm.control import MockControl
from multillm.mock_llm.protocol import DROP, MAX_LOGGED_CALLS, Fault, MockCall
from multillm.mock_llm.server import MockLLM, main

__all__ = ["DROP", "MAX_LOGGED_CALLS", "Fault", "MockCall", "MockControl", "MockLLM", "main"]
