"""The thread -> coroutine hand-off: items arrive in order, a waiting reader wakes, a closed loop is harmless."""

from __future__ import annotations

import threading

import anyio
import pytest

from localllm.runner.mailbox import Mailbox

pytestmark = pytest.mark.fast


async def test_items_put_from_a_thread_wake_the_reader_in_order() -> None:
    mailbox: Mailbox[int] = Mailbox()
    reader_waiting = threading.Event()

    def produce() -> None:
        reader_waiting.wait()
        for i in range(1000):
            mailbox.put(i)

    received: list[int] = []
    thread = threading.Thread(target=produce)
    thread.start()
    with anyio.fail_after(5):
        while len(received) < 1000:
            reader_waiting.set()
            received.extend(await mailbox.get_all())
    thread.join()
    assert received == list(range(1000))


async def test_get_all_returns_everything_queued_so_far() -> None:
    mailbox: Mailbox[str] = Mailbox()
    for item in "abc":
        mailbox.put(item)
    assert await mailbox.get_all() == ["a", "b", "c"]


def test_putting_after_the_event_loop_ended_is_harmless() -> None:
    holder: list[Mailbox[int]] = []

    async def main() -> None:
        mailbox: Mailbox[int] = Mailbox()
        holder.append(mailbox)
        async with anyio.create_task_group() as group:
            group.start_soon(mailbox.get_all)  # a reader waiting when the loop stops
            await anyio.sleep(0.01)
            group.cancel_scope.cancel()

    anyio.run(main)
    holder[0].put(1)  # the loop is gone: nothing to wake, no error
