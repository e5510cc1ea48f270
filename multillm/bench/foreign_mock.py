"""An OpenAI-compatible chat server that shares no code with `multillm.mock_llm`.

The scenarios "seen from outside" (`multillm.bench.outside`) measure against it, so that
nothing of ours sits on both sides of a comparison: our mock answers from a thread per
connection, and a stall there would land in the floor and in our figures alike. This one
is an `aiohttp.web` application on one asyncio loop (aiohttp comes with the openai SDK's
`aiohttp` extra). It answers every `POST /v1/chat/completions` with the same short
completion after `--latency-ms`, and nothing else: no faults, no streaming, no control API.

Run as a process of its own: `python -m multillm.bench.foreign_mock --port P --latency-ms L`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

from aiohttp import web

_ANSWER = "Queues decouple the sender from the receiver."


def app(latency_s: float) -> web.Application:
    ids = itertools.count()

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        if latency_s:
            await asyncio.sleep(latency_s)
        return web.json_response(
            {
                "id": f"foreign-{next(ids)}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", ""),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": _ANSWER}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17},
            },
        )

    application = web.Application()
    application.router.add_post("/v1/chat/completions", completions)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m multillm.bench.foreign_mock", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    # run_app ends cleanly on SIGTERM (its own handler), which is how the benchmark stops it.
    web.run_app(app(args.latency_ms / 1000), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
