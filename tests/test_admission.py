"""`Admission`: at most `concurrency` works at once, begun in order; a slot comes back once, at
`release()` or when the work ends however it ends; a delivery taken back never begins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pika

from multillm.workers.admission import Admission
from multillm.workers.messages import Delivery

Work = Callable[[Callable[[], None]], Awaitable[None]]


def _delivery(tag: int) -> Delivery:
    return Delivery(tag=tag, properties=pika.BasicProperties(), body=b"", redelivered=False, generation=1, queue="q")


async def _turns() -> None:
    """Let every task that can go on do so (nothing here waits for I/O)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Works:
    """Works that note when they begin and hold their slot until their gate opens."""

    def __init__(self) -> None:
        self.began: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.running = 0
        self.peak = 0

    def work(self, i: int, *, release_early: bool = False) -> Work:
        gate = self.gates[i] = asyncio.Event()

        async def work(release: Callable[[], None]) -> None:
            self.began.append(i)
            self.running += 1
            self.peak = max(self.peak, self.running)
            if release_early:
                release()
                release()  # a second time: must not give back a second slot
            try:
                await gate.wait()
            finally:
                self.running -= 1

        return work


def _admitted(concurrency: int, count: int) -> tuple[Admission, Works]:
    """`count` works (0, 1, ...) admitted in order to an `Admission(concurrency)`."""
    admission, works = Admission(concurrency), Works()
    for i in range(count):
        admission.admit(_delivery(i), works.work(i))
    return admission, works


def test_at_most_concurrency_works_run_and_the_rest_begin_in_order() -> None:
    async def scenario() -> None:
        admission, works = _admitted(2, 5)
        await _turns()
        assert works.began == [0, 1]
        works.gates[1].set()
        await _turns()
        assert works.began == [0, 1, 2]
        for gate in works.gates.values():
            gate.set()
        assert await admission.wait_idle(5)
        assert works.began == [0, 1, 2, 3, 4]
        assert works.peak == 2
        assert admission.running == 0

    asyncio.run(scenario())


def test_a_slot_given_back_early_is_given_back_once() -> None:
    async def scenario() -> None:
        admission, works = Admission(1), Works()
        admission.admit(_delivery(0), works.work(0, release_early=True))
        admission.admit(_delivery(1), works.work(1))
        admission.admit(_delivery(2), works.work(2))
        await _turns()
        # 0 gave its slot back while it goes on (its record, its reply): 1 has it, 2 waits.
        assert works.began == [0, 1]
        works.gates[0].set()  # 0 ends: its slot was given back already, none more
        await _turns()
        assert works.began == [0, 1]
        works.gates[1].set()
        await _turns()
        assert works.began == [0, 1, 2]
        works.gates[2].set()
        assert await admission.wait_idle(5)

    asyncio.run(scenario())


def test_cancelled_works_give_their_slots_back() -> None:
    async def scenario() -> None:
        admission, works = _admitted(1, 2)
        await _turns()
        await admission.cancel()  # past the grace period: the running one and the waiting one
        assert works.began == [0] and admission.running == 0
        admission.admit(_delivery(2), works.work(2))
        await _turns()
        assert works.began == [0, 2]
        works.gates[2].set()
        assert await admission.wait_idle(5)

    asyncio.run(scenario())


def test_deliveries_taken_back_while_they_wait_never_begin() -> None:
    async def scenario() -> None:
        admission, works = _admitted(1, 3)
        await _turns()
        assert [d.tag for d in admission.take_waiting()] == [1, 2]
        works.gates[0].set()
        assert await admission.wait_idle(5)
        assert works.began == [0]

    asyncio.run(scenario())
