"""The peer a user would pick instead: the same job as a Celery task with the RPC result backend.

Celery is a benchmark-only dependency (`pip install 'multillm[bench]'`). The worker
is started by the benchmark as `celery -A multillm.bench.celery_peer worker`, with
the broker and mock URLs in the environment, so this module reads them at import.
"""

from __future__ import annotations

import os
from typing import Any

import openai
from celery import Celery

from multillm.bench import ENV_BENCH_BROKER, ENV_BENCH_MOCK

QUEUE = "multillm-bench.celery"
MODELS_QUEUE = "multillm-bench.celery-models"

app = Celery("multillm_bench", broker=os.environ.get(ENV_BENCH_BROKER), backend="rpc://")
app.conf.update(
    task_default_queue=QUEUE,
    task_routes={"multillm_bench.other_model": {"queue": MODELS_QUEUE}},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Ack after the work, as our workers do: a killed worker's task is redelivered.
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_sdk = openai.OpenAI(base_url=os.environ.get(ENV_BENCH_MOCK, ""), api_key="unused", max_retries=0)


@app.task(name="multillm_bench.complete")
def complete(models: list[str], messages: list[dict[str, str]]) -> dict[str, Any]:
    """Fan out to the other models, call the first one, return its completion."""
    for other in models[1:]:
        other_model.delay(other, messages)
    response = _sdk.chat.completions.create(model=models[0].partition("/")[2], messages=messages)  # type: ignore[arg-type]
    return {
        "id": response.id,
        "text": response.choices[0].message.content,
        "usage": response.usage.model_dump() if response.usage else None,
    }


@app.task(name="multillm_bench.other_model", ignore_result=True)
def other_model(model: str, messages: list[dict[str, str]]) -> None:
    """Routed to its own queue, which nobody consumes in the benchmark (as our copies)."""
