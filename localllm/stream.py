"""The objects `generate` and `chat` return: an async iterator of chunks, awaitable to the final response.

`ThreadJob` feeds the same streams from a function running in a thread (the progress of `pull` and `create`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Generic, TypeVar

import anyio

from .errors import InvalidRequest
from .runner.mailbox import Mailbox

__all__ = ["AnswerJob", "ChunkStream", "Job", "ResponseStream", "ThreadJob"]

T = TypeVar("T")


class Job(Generic[T]):
    """One running request, seen from the stream: where chunks come from and how to stop it."""

    async def next_chunks(self) -> tuple[list[T], bool]:
        """Wait for the next chunks; the flag says whether the last one is final."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the request now (free its sequence slot) and release its runner. Idempotent, sync."""
        raise NotImplementedError


class AnswerJob(Job[T]):
    """A request answered whole by one call (an embedding): its one chunk is the answer."""

    def __init__(self, answer: Callable[[], Awaitable[T]]) -> None:
        self._answer = answer

    async def next_chunks(self) -> tuple[list[T], bool]:
        return [await self._answer()], True

    def close(self) -> None:
        pass


class ChunkStream(AsyncIterator[T]):
    """Iterates one request's chunks. Dropping it (breaking out of the loop) stops the request."""

    def __init__(self, open_job: Callable[[], Awaitable[Job[T]]]) -> None:
        self._open_job = open_job
        self._job: Job[T] | None = None
        self._buffer: deque[T] = deque()
        self._exhausted = False
        self._closed = False

    def __aiter__(self) -> ChunkStream[T]:
        return self

    def __await__(self) -> Generator[object, None, ChunkStream[T]]:
        """`await engine.chat(..., stream=True)` gives the stream itself, as the ollama client's AsyncClient does."""
        return self._itself().__await__()

    async def _itself(self) -> ChunkStream[T]:
        return self

    async def __anext__(self) -> T:
        while not self._buffer:
            if self._exhausted or self._closed:
                raise StopAsyncIteration
            try:
                if self._job is None:
                    self._job = await self._open_job()
                chunks, final = await self._job.next_chunks()
            except BaseException:
                self.close()  # cancelled or failed: free the slot at once
                raise
            self._buffer.extend(chunks)
            if final:
                self._exhausted = True
                self.close()
        return self._buffer.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._job is not None:
                self._job.close()

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class ResponseStream(Generic[T]):
    """Returned by `generate`/`chat`: `async for chunk in ...` or `await ...` for the whole response.

    Nothing runs until it is iterated or awaited, and it runs once.
    """

    def __init__(self, open_job: Callable[[], Awaitable[Job[T]]], combine: Callable[[Sequence[T]], T]) -> None:
        self._open_job = open_job
        self._combine = combine
        self._used = False

    def _start(self) -> ChunkStream[T]:
        if self._used:
            raise InvalidRequest("a response stream can be iterated or awaited only once")
        self._used = True
        return ChunkStream(self._open_job)

    def __aiter__(self) -> ChunkStream[T]:
        return self._start()

    def __await__(self) -> Generator[object, None, T]:
        return self._collect().__await__()

    async def _collect(self) -> T:
        stream = self._start()
        try:
            chunks = [chunk async for chunk in stream]
        finally:
            stream.close()
        return self._combine(chunks)


class _End:
    """What a `ThreadJob`'s thread posts last: how its work ended."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class ThreadJob(Job[T]):
    """A job whose chunks `work(emit, cancel)` emits from a thread of its own; create it in the event loop.

    `on_chunk` is awaited in the event loop for each chunk, in order, before the chunk is handed on.
    Closing the job sets `cancel` (work that checks it stops soon, the rest runs to its end unwatched);
    cancelling the task waiting on it also waits for `work` to return, so nothing is left half done.
    """

    def __init__(
        self,
        work: Callable[[Callable[[T], None], threading.Event], object],
        *,
        on_chunk: Callable[[T], Awaitable[None]] | None = None,
    ) -> None:
        self._mailbox: Mailbox[T | _End] = Mailbox()
        self._on_chunk = on_chunk
        self._cancel = threading.Event()
        self._finished = threading.Event()
        threading.Thread(target=self._run, args=(work,), name=f"localllm-job-{id(self):x}", daemon=True).start()

    def _run(self, work: Callable[[Callable[[T], None], threading.Event], object]) -> None:
        error: BaseException | None = None
        try:
            work(self._mailbox.put, self._cancel)
        except BaseException as exc:
            error = exc
        self._finished.set()
        self._mailbox.put(_End(error))

    async def next_chunks(self) -> tuple[list[T], bool]:
        try:
            chunks: list[T] = []
            for item in await self._mailbox.get_all():
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return chunks, True
                if self._on_chunk is not None:
                    await self._on_chunk(item)
                chunks.append(item)
            return chunks, False
        except anyio.get_cancelled_exc_class():
            self.close()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._finished.wait)
            raise

    def close(self) -> None:
        self._cancel.set()
