"""The object `generate` and `chat` return: an async iterator of chunks, awaitable to the final response."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Generic, TypeVar

from .errors import InvalidRequest

__all__ = ["ChunkStream", "Job", "ResponseStream"]

T = TypeVar("T")


class Job(Generic[T]):
    """One running request, seen from the stream: where chunks come from and how to stop it."""

    async def next_chunks(self) -> tuple[list[T], bool]:
        """Wait for the next chunks; the flag says whether the last one is final."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the request now (free its sequence slot) and release its runner. Idempotent, sync."""
        raise NotImplementedError


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
