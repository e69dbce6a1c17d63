"""The actor on each node: one `localllm.Engine` with the node's own model store.

It is an async actor: every method is a coroutine on the actor's event loop, so one actor serves
many requests at once (the engine batches them). `chat_stream` and `generate_stream` are async
generators the client consumes as Ray streaming generators.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..engine import Engine
from ..errors import ModelNotFound
from ..request import Request
from ..scheduler.devices import discover

__all__ = ["BLOB_CHUNK", "NodeEngine", "free_memory"]

BLOB_CHUNK = 4 << 20
"""Bytes per call when a model's blobs are copied from one node to another."""


def free_memory() -> int:
    """Bytes free on this machine as the memory planner sees them: host RAM plus every GPU's free memory."""
    inventory = discover()
    return inventory.system.free + sum(gpu.free_memory for gpu in inventory.gpus)


class NodeEngine:
    """A local `Engine` served to the cluster. `engine_options` are `Engine`'s keyword arguments.

    With a ``home`` in them, the node keeps its models under ``home/<node id>``, so nodes that
    share a file system (or one machine, in tests) still have a store each.
    """

    def __init__(self, node_id: str, engine_options: dict[str, Any] | None = None) -> None:
        options = dict(engine_options or {})
        home = options.pop("home", None)
        if home is not None:
            home = Path(home) / node_id
            home.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.engine = Engine(home, **options)

    async def close(self) -> None:
        await self.engine.aclose()

    # -- state

    async def status(self) -> tuple[list[str], int]:
        """(the loaded models' names, free memory in bytes)."""
        running = await self.engine.ps()
        return [m.name for m in running.models], free_memory()

    async def has_model(self, model: str) -> bool:
        try:
            await self.engine.show(model)
        except ModelNotFound:
            return False
        return True

    # -- generation

    async def send_stream(self, request: Request[Any]) -> AsyncIterator[Any]:
        """The chunks of a request (`Engine.send` with ``stream=True``), as the client consumes them."""
        stream = self.engine.send(request, stream=True)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            stream.close()

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One of the engine's other methods (embed, list, show, ps, create, create_blob, pull, copy, delete, load,
        unload)."""
        if method not in _CALLS:
            raise AttributeError(f"the engine has no method {method!r} served to the cluster")
        return await getattr(self.engine, method)(*args, **kwargs)

    # -- copying models between nodes

    async def export_manifest(self, model: str) -> tuple[bytes, list[tuple[str, int]]]:
        """The manifest of `model` as stored, and the (digest, size) of each blob it names."""
        import anyio

        registry = self.engine.registry

        def export() -> tuple[bytes, list[tuple[str, int]]]:
            name, manifest = registry.find(model)
            data = registry.store.manifest_path(name).read_bytes()  # as stored: its digest stays the same
            return data, [(layer.digest, layer.size) for layer in (manifest.config, *manifest.layers)]

        return await anyio.to_thread.run_sync(export)

    async def read_blob(self, digest: str, offset: int, size: int) -> bytes:
        """Up to `size` bytes of blob `digest` from `offset`."""
        import anyio

        path = self.engine.blob_path(digest)

        def read() -> bytes:
            with path.open("rb") as file:
                file.seek(offset)
                return file.read(size)

        return await anyio.to_thread.run_sync(read)

    async def import_model(self, model: str, source: Any) -> list[str]:
        """Copy `model` from the actor `source`: its missing blobs (each checked against its digest), then its manifest.

        Returns the digests copied. A blob is written under a temporary name and renamed only once
        its bytes hash to its digest, and the manifest is written only once every blob is in place.
        """
        import anyio

        from ..registry.names import ModelName
        from ..registry.store import Manifest

        data, blobs = await source.export_manifest.remote(model)
        copied = []
        for digest, size in blobs:
            if await self.engine.has_blob(digest):
                continue

            async def chunks(digest: str = digest, size: int = size) -> AsyncIterator[bytes]:
                offset = 0
                while offset < size:
                    chunk: bytes = await source.read_blob.remote(digest, offset, BLOB_CHUNK)
                    if not chunk:
                        break
                    offset += len(chunk)
                    yield chunk

            await self.engine.add_blob(digest, chunks(), max_size=size)
            copied.append(digest)
        manifest = Manifest.from_json(data)
        store = self.engine.registry.store

        def commit() -> None:
            with store.lock:
                missing = [d for d in manifest.digests if not store.has_blob(d)]
                if missing:
                    raise ModelNotFound(f"blobs of model '{model}' went missing while it was copied: {missing}")
                store.commit_manifest(store.resolve_name(ModelName.parse(model)), manifest)

        await anyio.to_thread.run_sync(commit)
        return copied


_CALLS = frozenset("embeddings render list show ps create create_blob pull copy delete load unload has_blob".split())
