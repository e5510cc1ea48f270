"""What each subcommand does; argument parsing stays in `multillm.cli`."""

from __future__ import annotations

import argparse
import os
import sys
import threading

import kombu.exceptions
import msgspec

from multillm import contract, tracing
from multillm.config import Settings, load_settings
from multillm.errors import CommandError, MultiLLMError, RpcError
from multillm.producers import Client, ReplyStream, make_request
from multillm.producers.publishing import queue_counts
from multillm.schemas import ChatMessage, encode


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "mock-llm":
        from multillm.mock_llm import main as serve_mock

        serve_mock(args.host, args.port, args.latency_ms, args.token_delay_ms)
        return 0
    settings = load_settings(args.config)
    if args.command in ("worker", "request", "demo", "replay"):
        # Spans go out only where the OTEL_* environment asks (multillm/tracing.py).
        tracing.configure(f"multillm-{args.command}" + (f"-{args.kind}" if args.command == "worker" else ""))
    try:
        return _dispatch(settings, args)
    finally:
        tracing.shutdown()


def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "worker":
        return _worker(settings, args)
    if args.command == "request":
        return _request(settings, args)
    if args.command == "demo":
        from multillm.cli.demo import run_demo

        return run_demo(settings, requests=args.requests, latency_ms=args.latency_ms)
    if args.command == "chaos":
        from multillm.testbed.chaos import run_chaos

        return run_chaos(settings, requests=args.requests, duration=args.duration, seed=args.seed, cluster=args.cluster)
    if args.command == "bench":
        from multillm.cli.bench import run_bench_command

        return run_bench_command(
            settings, only=args.only, quick=args.quick, output=args.output, postgres_url=args.postgres_url or None
        )
    if args.command == "replay":
        from multillm.cli.replay import run_replay

        return run_replay(settings, args)
    if args.command == "logs":
        from multillm.cli.logs import run_logs

        return run_logs(settings, args)
    raise CommandError(f"unknown command {args.command!r}")


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from multillm.workers import run_judge_worker, run_model_worker, run_primary_worker

    if args.kind == "primary":
        code = run_primary_worker(settings, args.concurrency, args.metrics_port)
    elif args.kind == "judge":
        code = run_judge_worker(settings, args.model, args.concurrency, args.sample, args.metrics_port)
    else:
        code = run_model_worker(settings, args.model, args.concurrency, args.metrics_port)
    tracing.shutdown()  # its last spans out, before an exit that would skip `dispatch`'s
    if stuck := [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]:
        # The worker left a sink thread stuck in a write (a database that stopped answering, see
        # `workers._serve`): the interpreter's exit would wait for it for ever. Everything else is
        # closed, and the record's message was not acked, so it is redelivered.
        print(f"multillm: exiting with threads still busy: {', '.join(stuck)}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _request(settings: Settings, args: argparse.Namespace) -> int:
    messages = [ChatMessage(role="user", content=args.prompt)]
    if args.system:
        messages.insert(0, ChatMessage(role="system", content=args.system))
    try:
        request = make_request(args.model, messages, display_model=args.display_model)
    except (ValueError, msgspec.ValidationError) as exc:
        raise CommandError(f"invalid request: {exc}") from None
    request_id: str | None = None
    try:
        with connect_client(settings) as client:
            if not queue_counts(settings.broker_url, contract.REQUEST_QUEUE)[1]:
                print(
                    f"no primary worker is serving {contract.REQUEST_QUEUE} yet (start `multillm worker primary`);"
                    f" waiting up to {args.timeout:g}s",
                    file=sys.stderr,
                )
            if args.stream:
                stream = client.stream(request, timeout=args.timeout)
                request_id = stream.request_id
                _print_stream(stream, args.json)
                assert stream.reply is not None
                reply = stream.reply
            else:
                pending = client.submit(request, timeout=args.timeout)
                request_id = pending.request_id
                reply = client.wait(pending, timeout=args.timeout)
    except RpcError as exc:
        if args.stream and not args.json:
            print()  # end the line the deltas were on
        print(encode(exc.to_status()).decode() if args.json else f"error: {exc}")
        _print_request_id(request_id)
        return 1
    except MultiLLMError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(encode(reply).decode())
    else:
        if not args.stream:
            print(reply.text)
        print(
            f"\n(primary log id {reply.id}, {reply.completion.model}, external id {reply.primary_external_id})",
            file=sys.stderr,
        )
    _print_request_id(request_id)
    return 0


def _print_stream(stream: ReplyStream, as_json: bool) -> None:
    """The deltas as they come: text on stdout, then a newline once the reply is in; or a JSON line each."""
    for delta in stream:
        if as_json:
            print(encode(delta).decode(), flush=True)
            continue
        if delta.restart:
            print("\n(the answer started over: a retry or another worker)", file=sys.stderr, flush=True)
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    if not as_json:
        print()


def _print_request_id(request_id: str | None) -> None:
    """On stderr, so that stdout stays the answer (or its JSON) alone."""
    if request_id is not None:
        print(f"request id {request_id}  (multillm logs show {request_id})", file=sys.stderr)


def connect_client(settings: Settings) -> Client:
    """A client, or a one-line error naming the broker (without its password) when none answers."""
    try:
        return Client(settings.broker_url, connect_timeout=5.0)
    except (OSError, kombu.exceptions.OperationalError, MultiLLMError) as exc:
        raise CommandError(f"{exc}; start RabbitMQ (make demo does) or set MULTILLM_BROKER_URL") from None
