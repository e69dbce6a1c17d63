"""`ClusterEngine`: the Engine API over a Ray cluster, one `NodeEngine` actor per node."""

from __future__ import annotations

import inspect
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import attrs
import ray
from ray.exceptions import ActorUnschedulableError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..embeddings import EmbeddingsResponse, EmbedResponse
from ..errors import EngineClosed, InvalidRequest, LocalLLMError, ModelNotFound, RunnerError, UnavailableError
from ..request import ChatRequest, EmbedRequest, GenerateRequest, Request, takes_fields_of
from ..stream import ChunkStream, Job, ResponseStream
from ..types import (
    ChatResponse,
    GenerateResponse,
    ListResponse,
    MessageLike,
    ProcessResponse,
    ProgressResponse,
    ShowResponse,
    StatusResponse,
    combine_chat,
    combine_generate,
)
from .node import NodeEngine
from .router import Router, chat_prefix_keys, generate_prefix_keys, model_key

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..request import ChatFields, GenerateFields

__all__ = ["ClusterEngine"]

T = TypeVar("T")
R = TypeVar("R")

REVIVE_BACKOFF_MAX = 60.0
"""Seconds, at most, between a node's engine dying again and again and the next new one (the wait doubles
from nothing with each death within this long of the last one)."""

# What a call on an actor raises when the actor is gone (died, killed, or could not be placed on its node).
_ACTOR_GONE = (RayActorError, ActorUnschedulableError)


def _last(chunks: Sequence[T]) -> T:
    return chunks[-1]


_END = object()


def _on_asyncio() -> bool:
    """Whether this runs under asyncio, where Ray's object refs are awaited directly (elsewhere: in a thread)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ClusterEngine:
    """The `Engine` API, served by one engine per node of a Ray cluster.

    ``address`` is what `ray.init` takes: None (join the cluster this process is part of, or start
    a local one), ``"auto"`` or ``"ray://head:10001"``. ``engine_options`` are each node's `Engine`
    keyword arguments (a ``home`` gets one sub-folder per node). Requests go to a node that has the
    model loaded (preferring the one that served the same conversation before), else to the least
    loaded node; a node that lacks the model gets a copy from one that has it. More than
    ``max_queue`` requests in flight across the cluster fail with `QueueFull`.

    When a node's engine dies (llama.cpp aborted, or the OOM killer took it), the requests it was
    serving fail with `RunnerError` and a new engine is started on that node while its Ray node is
    alive, with the same store; a node that left the cluster is not routed to again.

    As an `Engine`, it starts on first use (connecting to the cluster and starting the node actors)
    and is closed by `aclose()`, by leaving ``async with``, or when it is garbage-collected or the
    interpreter exits.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        engine_options: Mapping[str, Any] | None = None,
        max_queue: int = 512,
        spill_at: int = 4,
        refresh_interval: float = 1.0,
        actor_num_cpus: float = 0.1,
        ray_init_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.engine_options = dict(engine_options or {})
        self.refresh_interval = refresh_interval
        self.actor_num_cpus = actor_num_cpus
        self.ray_init_options = dict(ray_init_options or {})
        self.router = Router(max_queue=max_queue, spill_at=spill_at)
        #: The node that the last routed request went to.
        self.last_node: str | None = None
        self._actors: dict[str, Any] = {}
        self._incarnations: dict[str, int] = {}  # node -> how many actors were started there
        self._lost: set[str] = set()  # nodes that left the cluster: not used again
        self._deaths: dict[str, tuple[int, float]] = {}  # node -> (deaths in a row, when its actor last died)
        self._stored: dict[str, set[str]] = {}  # node -> model keys known to be in its store
        self._lock = threading.RLock()
        self._ensure_locks: dict[tuple[str, str], threading.Lock] = {}
        self._refreshed = 0.0
        self._refreshing = False
        self._owns_ray = False
        self._started = False
        self._closed = False
        self._start_lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> ClusterEngine:
        await self._refresh()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def start(self) -> None:
        """Connect to the cluster and start an engine actor on each alive node (blocking); the first
        request does this itself."""
        with self._start_lock:
            if self._closed:
                raise EngineClosed("this cluster engine is closed; open a new one")
            if self._started:
                return
            if not ray.is_initialized():
                ray.init(address=self.address, **self.ray_init_options)
                self._owns_ray = True
            self._started = True
            # Dropped unclosed (a notebook cell run again) or left open at exit: its actors still end.
            self._finalizer = weakref.finalize(self, _end_actors, self._actors, self._owns_ray)
            self._refresh_sync()
            if not self._actors:
                raise UnavailableError("the Ray cluster has no alive node to run an engine on")

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """Close every node's engine and end the actors (and Ray, when this engine started it).
        The engine cannot be used afterwards."""
        with self._start_lock:
            self._closed = True
            if not self._started:
                return
            self._started = False
            if self._finalizer is not None:
                self._finalizer.detach()
            actors = dict(self._actors)
            self._actors.clear()
        _end_actors(actors, self._owns_ray)

    # -- nodes -----------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        """The ids of the nodes requests are routed to."""
        with self._lock:
            return sorted(self._actors)

    def actor(self, node_id: str) -> Any:
        """The `NodeEngine` actor handle of a node."""
        with self._lock:
            try:
                return self._actors[node_id]
            except KeyError:
                raise UnavailableError(f"node {node_id} is not part of the cluster engine") from None

    def _start_actor(self, node_id: str) -> Any:
        # Restarted by this router rather than by Ray (max_restarts): a dead actor's in-flight calls then
        # fail at once, and a node that left the cluster is told apart from one whose engine died.
        remote = ray.remote(NodeEngine).options(
            num_cpus=self.actor_num_cpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            max_restarts=0,
        )
        return remote.remote(node_id, self.engine_options)

    def _drop(self, node_id: str, actor: Any = None) -> None:
        """The actor of `node_id` (`actor`, when given: only that one) died: stop routing to it until the next
        refresh starts a new one, if the node is still alive."""
        with self._lock:
            current = self._actors.get(node_id)
            if current is None or (actor is not None and current is not actor):
                return  # already dropped, or a newer actor serves the node
            del self._actors[node_id]
            self._stored.pop(node_id, None)
            self.router.remove(node_id)
            count, last = self._deaths.get(node_id, (0, 0.0))
            now = time.monotonic()
            self._deaths[node_id] = (count + 1 if now - last < REVIVE_BACKOFF_MAX else 1, now)
            self._refreshed = 0.0  # the next request looks at the nodes again
        try:
            ray.kill(current)  # if only unreachable, it must not go on writing to the store the next one uses
        except Exception:
            pass

    def _revive_at(self, node_id: str) -> float:
        """When a node whose actor died may get a new one: at once, then after 1, 2, 4... s while it keeps dying."""
        count, last = self._deaths.get(node_id, (0, 0.0))
        if count <= 1:
            return last
        return last + min(2.0 ** (count - 2), REVIVE_BACKOFF_MAX)

    def _refresh_sync(self) -> None:
        """Start actors on new nodes and on alive nodes whose actor died, forget nodes that left the cluster,
        and read each node's loaded models and free memory."""
        now = time.monotonic()
        for node in ray.nodes():
            node_id = node.get("NodeID")
            if not node_id or node_id in self._lost:
                continue
            if not node.get("Alive"):
                if node_id in self._actors or node_id in self._deaths:
                    self._drop(node_id)
                    with self._lock:
                        self._lost.add(node_id)  # a node's id is never reused: it is gone for good
                        self._deaths.pop(node_id, None)
                continue
            if node_id in self._actors or self._revive_at(node_id) > now:
                continue
            actor = self._start_actor(node_id)
            with self._lock:
                self._actors[node_id] = actor
                self._incarnations[node_id] = self._incarnations.get(node_id, 0) + 1
                self._stored.setdefault(node_id, set())
        with self._lock:
            actors = dict(self._actors)
        refs = {node_id: actor.status.remote() for node_id, actor in actors.items()}
        for node_id, ref in refs.items():
            try:
                loaded, free = ray.get(ref, timeout=120)
            except _ACTOR_GONE:
                self._drop(node_id, actors[node_id])
                continue
            except Exception:  # slow or failing: keep what is known of it
                continue
            with self._lock:
                if node_id in self._actors:
                    self.router.update(node_id, loaded=loaded, free_memory=free)
        self._refreshed = time.monotonic()

    async def _refresh(self) -> None:
        """Start on first use; then, at most every `refresh_interval`, look at the nodes again."""
        if not self._started:
            await anyio.to_thread.run_sync(self.start)
        if self._refreshing or time.monotonic() - self._refreshed < self.refresh_interval:
            return
        self._refreshing = True
        try:
            await anyio.to_thread.run_sync(self._refresh_sync)
        finally:
            self._refreshing = False

    async def _get(self, node_id: str, actor: Any, ref: Any) -> Any:
        """The value of `ref`, a call on `node_id`'s `actor`; its engine's own errors are raised as they are."""
        try:
            if _on_asyncio():
                return await ref
            return await anyio.to_thread.run_sync(ray.get, ref, abandon_on_cancel=True)
        except BaseException as exc:
            raise self._translate(node_id, actor, exc) from None

    def _translate(self, node_id: str, actor: Any, exc: BaseException) -> BaseException:
        if isinstance(exc, _ACTOR_GONE):
            self._drop(node_id, actor)
            return RunnerError(
                f"the engine on node {node_id} died ({exc.__class__.__name__}); a new one is started there "
                "while the node is alive: send the request again"
            )
        if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
            return exc.cause
        return exc

    async def _call(self, node_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        actor = self.actor(node_id)
        return await self._get(node_id, actor, actor.call.remote(method, args, kwargs))

    async def _each(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """`method` on every node at once: node id -> result, or the exception it raised."""
        await self._refresh()
        results: dict[str, Any] = {}

        async def one(node_id: str) -> None:
            try:
                results[node_id] = await self._call(node_id, method, *args, **kwargs)
            except Exception as exc:
                results[node_id] = exc

        async with anyio.create_task_group() as group:
            for node_id in self.nodes:
                group.start_soon(one, node_id)
        return results

    # -- models on nodes ---------------------------------------------------------------

    def _has_model_sync(self, node_id: str, model: str) -> bool:
        actor = self.actor(node_id)
        try:
            return bool(ray.get(actor.has_model.remote(model), timeout=60))
        except BaseException as exc:
            raise self._translate(node_id, actor, exc) from None

    def _ensure_sync(self, node_id: str, model: str) -> list[str]:
        key = model_key(model)
        with self._lock:
            if key in self._stored.get(node_id, ()):
                return []
            lock = self._ensure_locks.setdefault((node_id, key), threading.Lock())
        with lock:
            if key in self._stored.get(node_id, ()) or self._has_model_sync(node_id, model):
                with self._lock:
                    self._stored.setdefault(node_id, set()).add(key)
                return []
            for source in self.nodes:
                if source == node_id:
                    continue
                try:
                    if not self._has_model_sync(source, model):
                        continue
                except LocalLLMError:
                    continue
                actor = self.actor(node_id)
                try:
                    copied: list[str] = ray.get(actor.import_model.remote(model, self.actor(source)))
                except BaseException as exc:
                    raise self._translate(node_id, actor, exc) from None
                with self._lock:
                    self._stored.setdefault(node_id, set()).add(key)
                return copied
            return []  # nowhere: the node's engine says what is wrong (a path, or a missing model)

    async def replicate(self, model: str, node_id: str) -> list[str]:
        """Copy `model` to `node_id` from a node that has it, unless it has it already; the blob digests copied.

        Each blob is checked against its digest as it lands, and the manifest is written last.
        """
        self.actor(node_id)
        return await anyio.to_thread.run_sync(self._ensure_sync, node_id, model)

    async def _route(self, model: str, lookups: Sequence[str] = (), record: str | None = None) -> _Lease:
        """Choose a node for a request on `model`, count it in flight and make sure the node has the model."""
        await self._refresh()
        with self._lock:
            node_id = self.router.acquire(model, lookups, record)
            self.last_node = node_id
            lease = _Lease(node_id, self._incarnations.get(node_id, 0))
        try:
            await self.replicate(model, node_id)
        except BaseException:
            self._release(lease)
            raise
        return lease

    def _release(self, lease: _Lease) -> None:
        with self._lock:
            # A request that outlived its node's actor was counted on the old one, not on its successor.
            if self._incarnations.get(lease.node_id, 0) == lease.incarnation:
                self.router.release(lease.node_id)

    # -- generation --------------------------------------------------------------------

    @overload
    def send(self, request: Request[R], *, stream: Literal[False] = False) -> ResponseStream[R]: ...

    @overload
    def send(self, request: Request[R], *, stream: Literal[True]) -> ChunkStream[R]: ...

    @overload
    def send(self, request: Request[R], *, stream: bool) -> ResponseStream[R] | ChunkStream[R]: ...

    def send(self, request: Request[Any], *, stream: bool = False) -> ResponseStream[Any] | ChunkStream[Any]:
        """As `Engine.send`, on a node of the cluster: the frozen request goes to the node as it is."""
        combine: Callable[[Sequence[Any]], Any]
        if isinstance(request, ChatRequest):
            keys = chat_prefix_keys(request.model, [(m.role, m.content or "") for m in request.messages])
            combine = combine_chat
        elif isinstance(request, GenerateRequest):
            keys = generate_prefix_keys(request.model, request.system, request.prompt)
            combine = combine_generate
        elif isinstance(request, EmbedRequest):
            keys, combine = ([], ""), _last
        else:
            raise InvalidRequest(
                f"send() takes a GenerateRequest, ChatRequest or EmbedRequest, got {type(request).__name__}"
            )

        async def open_job() -> Job[Any]:
            lease = await self._route(request.model, keys[0], keys[1] or None)
            try:
                actor = self.actor(lease.node_id)
                generator = actor.send_stream.options(num_returns="streaming").remote(request)
            except BaseException:
                self._release(lease)
                raise
            return _RemoteJob(self, lease, actor, generator)

        return ChunkStream(open_job) if stream else ResponseStream(open_job, combine)

    @takes_fields_of(GenerateRequest)
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[GenerateFields],
    ) -> ResponseStream[GenerateResponse] | ChunkStream[GenerateResponse]:
        """As `Engine.generate`, on a node of the cluster."""
        return self.send(GenerateRequest(model, prompt, suffix=suffix, **fields), stream=stream)

    @takes_fields_of(ChatRequest)
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[ChatFields],
    ) -> ResponseStream[ChatResponse] | ChunkStream[ChatResponse]:
        """As `Engine.chat`, on a node of the cluster."""
        return self.send(ChatRequest(model, messages, **fields), stream=stream)

    async def embed(
        self,
        model: str,
        input: str | Sequence[str],
        truncate: bool | None = True,
        options: Any = None,
        keep_alive: float | str | None = None,
        dimensions: int | None = None,
    ) -> EmbedResponse:
        """As `Engine.embed`, on a node of the cluster."""
        request = EmbedRequest(
            model, input, truncate=truncate is not False, options=options, keep_alive=keep_alive, dimensions=dimensions
        )
        return await self.send(request)

    async def _on_routed(self, model: str, method: str, *args: Any, **kwargs: Any) -> Any:
        lease = await self._route(model)
        try:
            return await self._call(lease.node_id, method, *args, **kwargs)
        finally:
            self._release(lease)

    async def render(self, request: GenerateRequest | ChatRequest) -> str:
        """As `Engine.render`, on the node a request for the model would go to."""
        rendered: str = await self._on_routed(request.model, "render", request)
        return rendered

    async def embeddings(self, model: str, prompt: str, **kwargs: Any) -> EmbeddingsResponse:
        result: EmbeddingsResponse = await self._on_routed(model, "embeddings", model, prompt, **kwargs)
        return result

    async def load(self, model: str, **kwargs: Any) -> None:
        """Load a model on the node a request for it would go to now."""
        await self._on_routed(model, "load", model, **kwargs)

    async def unload(self, model: str) -> None:
        """Unload a model on every node that has it loaded."""
        await self._refresh()
        key = model_key(model)
        with self._lock:
            holders = [n.node_id for n in self.router.nodes.values() if key in n.loaded]
        for node_id in holders:
            try:
                await self._call(node_id, "unload", model)
            except ModelNotFound:
                pass
        self._refreshed = 0.0

    # -- the registry --------------------------------------------------------------------

    async def _progress(self, node_id: str, method: str, model: str, kwargs: dict[str, Any]) -> Any:
        progress = kwargs.pop("progress", None)
        stream = bool(kwargs.pop("stream", False))
        final: ProgressResponse = await self._call(node_id, method, model, **kwargs)
        with self._lock:
            self._stored.setdefault(node_id, set()).add(model_key(model))
        if progress is not None:
            result = progress({"status": final.status})
            if inspect.isawaitable(result):
                await result
        if stream:

            async def open_job() -> Job[ProgressResponse]:
                return _DoneJob([final])

            return ChunkStream(open_job)
        return final

    async def create(self, model: str, *, node: str | None = None, **kwargs: Any) -> Any:
        """As `Engine.create`, on one node (`node`, else the one a request would go to): paths are that node's.

        Progress is coarse: one final status.
        """
        await self._refresh()
        if node is None:
            with self._lock:
                node = self.router.choose(model)
        await self._forget(model)
        return await self._progress(node, "create", model, kwargs)

    async def pull(self, model: str, *, node: str | None = None, **kwargs: Any) -> Any:
        """As `Engine.pull`, on one node; other nodes copy the model from it when they need it."""
        await self._refresh()
        if node is None:
            with self._lock:
                node = self.router.choose(model)
        return await self._progress(node, "pull", model, kwargs)

    async def _forget(self, model: str) -> None:
        key = model_key(model)
        with self._lock:
            for stored in self._stored.values():
                stored.discard(key)

    async def list(self) -> ListResponse:
        """Every node's models (one entry per name and digest, the latest modified)."""
        seen: dict[tuple[str, str], Any] = {}
        for result in (await self._each("list")).values():
            if isinstance(result, ListResponse):
                for entry in result.models:
                    key = (entry.model, entry.digest)
                    if key not in seen or entry.modified_at > seen[key].modified_at:
                        seen[key] = entry
        return ListResponse(models=sorted(seen.values(), key=lambda e: e.modified_at, reverse=True))

    async def show(self, model: str, **kwargs: Any) -> ShowResponse:
        """As `Engine.show`, from the first node that has the model."""
        await self._refresh()
        error: BaseException = ModelNotFound(model=model)
        for node_id in self.nodes:
            try:
                result: ShowResponse = await self._call(node_id, "show", model, **kwargs)
                return result
            except ModelNotFound as exc:
                error = exc
        raise error

    async def ps_by_node(self) -> dict[str, ProcessResponse]:
        """Each node's loaded models."""
        return {n: r for n, r in (await self._each("ps")).items() if isinstance(r, ProcessResponse)}

    async def ps(self) -> ProcessResponse:
        """The loaded models of every node (`ps_by_node` tells which node holds which)."""
        return ProcessResponse(models=[m for r in (await self.ps_by_node()).values() for m in r.models])

    async def _on_holders(self, method: str, model: str, *args: Any) -> StatusResponse:
        found = False
        for result in (await self._each(method, model, *args)).values():
            if isinstance(result, ModelNotFound):
                continue
            if isinstance(result, BaseException):
                raise result
            found = True
        if not found:
            raise ModelNotFound(model=model)
        return StatusResponse(status="success")

    async def copy(self, source: str, destination: str) -> StatusResponse:
        """As `Engine.copy`, on every node that has `source`."""
        await self._forget(destination)
        return await self._on_holders("copy", source, destination)

    # -- blobs: uploads name one machine's files, so a cluster does not take them

    async def has_blob(self, digest: str) -> bool:
        return False

    async def create_blob(self, path: str | os.PathLike[str], *, node: str | None = None) -> str:
        """Add one of `node`'s files to that node's store, for `create(files=..., node=node)` (a vision model's
        file and projector, say). A cluster takes no blob without a node: it is no one machine's store."""
        if node is None:
            raise InvalidRequest(
                "a cluster does not take uploaded blobs: name the node whose file it is (create_blob(path, node=...))"
            )
        await self._refresh()
        return str(await self._call(node, "create_blob", os.fspath(path)))

    async def add_blob(self, digest: str, chunks: Any, *, max_size: int | None = None) -> None:
        raise InvalidRequest("a cluster does not take uploaded blobs: create the model on a node from its files")

    def blob_path(self, digest: str) -> Any:
        raise InvalidRequest("a cluster does not take uploaded blobs: create the model on a node from its files")

    async def delete(self, model: str, *, node: str | None = None) -> StatusResponse:
        """As `Engine.delete`, on every node that has the model (or on `node` only)."""
        await self._forget(model)
        if node is None:
            return await self._on_holders("delete", model)
        await self._refresh()
        result: StatusResponse = await self._call(node, "delete", model)
        return result


def _end_actors(actors: Mapping[str, Any], owns_ray: bool) -> None:
    """Close each node's engine (waiting a while), end its actor, and shut Ray down when we started it."""
    actors = dict(actors)
    try:
        ray.get([actor.close.remote() for actor in actors.values()], timeout=30)
    except Exception:
        pass
    for actor in actors.values():
        try:
            ray.kill(actor)
        except Exception:
            pass
    if owns_ray:
        ray.shutdown()


@attrs.frozen
class _Lease:
    """A request counted in flight on a node, served by the node's `incarnation`-th actor."""

    node_id: str
    incarnation: int


@attrs.define
class _DoneJob(Job[T]):
    chunks: list[T]

    async def next_chunks(self) -> tuple[list[T], bool]:
        return self.chunks, True

    def close(self) -> None:
        pass


class _RemoteJob(Job[T]):
    """One request running on a node's actor, read through Ray's streaming generator."""

    def __init__(self, cluster: ClusterEngine, lease: _Lease, actor: Any, generator: Any) -> None:
        self._cluster = cluster
        self._lease = lease
        self._actor = actor
        self._generator = generator
        self._released = False

    def _next_sync(self) -> Any:
        try:
            ref = next(self._generator)
        except StopIteration:
            return _END
        return ray.get(ref)

    async def _next(self) -> Any:
        if _on_asyncio():
            try:
                ref = await self._generator.__anext__()
            except StopAsyncIteration:
                return _END
            return await ref
        return await anyio.to_thread.run_sync(self._next_sync, abandon_on_cancel=True)

    async def next_chunks(self) -> tuple[list[T], bool]:
        try:
            chunk = await self._next()
        except BaseException as exc:
            self.close()
            raise self._cluster._translate(self._lease.node_id, self._actor, exc) from None
        if chunk is _END:
            self._release()
            return [], True
        final = bool(getattr(chunk, "done", False))
        if final:
            self._release()
        return [chunk], final

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._cluster._release(self._lease)

    def close(self) -> None:
        if not self._released:
            try:
                ray.cancel(self._generator)
            except Exception:
                pass
        self._release()
