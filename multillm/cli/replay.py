"""`multillm replay`: the logged input of the requests the filters select, sent again to other models
through their queues (multillm/replaying.py says how), at most `--rate` requests a second."""

from __future__ import annotations

import argparse
import sys
import time

from multillm import contract
from multillm.cli.logs import open_for_reading, record_filter
from multillm.config import Settings
from multillm.errors import BrokerUnavailable, CommandError, ConfigError, RpcError
from multillm.producers.publishing import RequestPublisher, queue_counts
from multillm.progress import progress
from multillm.records import log_id_for
from multillm.replaying import REPLAYED_INDEX, Replay, logged_inputs, replay
from multillm.schemas import model_name_problem
from multillm.sinks import Sink

# A broker that does not confirm one copy within this long is down: say so rather than wait.
_PUBLISH_TIMEOUT_SECONDS = 30.0


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    models: list[str] = list(dict.fromkeys(args.models))
    for model in models:
        if problem := model_name_problem(model):
            raise ConfigError(f"--model {model!r}: {problem}")
    sink = open_for_reading(args.sink or settings.sink_url)
    try:
        inputs = logged_inputs(sink.records(where=record_filter(args)))
        if args.limit is not None:
            inputs = inputs[-args.limit :]
        planned = [replay(source, model) for source in inputs for model in models]
        todo = [r for r in planned if not _answered_before(sink, r)]
    finally:
        sink.close()
    before = len(planned) - len(todo)
    counted = f"{len(inputs)} requests to {', '.join(models)}: {len(todo)} copies ({before} answered before, skipped)"
    if args.dry_run:
        print(f"would replay {counted}")
        return 0
    if not inputs:
        raise CommandError("no records match the filters: nothing to replay")
    _check_served(settings.broker_url, models)
    _send(settings.broker_url, todo, None if args.rate is None else args.rate * len(models))
    print(f"replayed {counted}")
    print(
        f"their records carry log attribute {contract.ATTR_REPLAY_OF}; compare with"
        f" `multillm logs compare --baseline MODEL --candidate {models[0]}`"
    )
    return 0


def _answered_before(sink: Sink, planned: Replay) -> bool:
    """Whether the model has a record for the request already: in the request itself, or by a replay."""
    if any(r.model_name == planned.model for r in sink.records(planned.origin)):
        return True
    return any(r.model_index == REPLAYED_INDEX for r in sink.records(planned.request_id))


def _check_served(broker_url: str, models: list[str]) -> None:
    """Raises CommandError naming each model whose queue no worker consumes: its copies would wait for ever."""
    try:
        unserved = [m for m in models if queue_counts(broker_url, contract.model_queue(m))[1] == 0]
    except OSError as exc:
        raise CommandError(f"cannot reach the broker: {exc}") from None
    if unserved:
        starts = "; ".join(f"`multillm worker model --model {m}`" for m in unserved)
        raise CommandError(f"no worker serves {', '.join(unserved)}: start {starts}, then replay again")


def _send(broker_url: str, todo: list[Replay], rate: float | None) -> None:
    """Publish `todo`, at most `rate` copies a second."""
    try:
        publisher = RequestPublisher(broker_url, pool_size=1)
    except Exception as exc:  # kombu's and amqp's own: the broker is down or refused the declarations
        raise CommandError(f"cannot reach the broker: {exc}") from None
    started = time.monotonic()
    sent = 0
    try:
        with progress("replaying", len(todo)) as update:
            for sent, planned in enumerate(todo):
                if rate is not None and (ahead := started + sent / rate - time.monotonic()) > 0:
                    time.sleep(ahead)
                message_id = log_id_for(planned.request_id, REPLAYED_INDEX)
                publisher.publish_copy(planned.copy, message_id, timeout=_PUBLISH_TIMEOUT_SECONDS)
                update(sent + 1)
    except (BrokerUnavailable, RpcError) as exc:
        print(f"multillm: stopped after {sent} of {len(todo)} copies", file=sys.stderr)
        raise CommandError(str(exc)) from None
    finally:
        publisher.close()
