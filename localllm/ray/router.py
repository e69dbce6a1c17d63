"""Which node serves a request: pure bookkeeping, no Ray (unit-tested on its own).

The order of preference:

1. the node that served the same conversation prefix before (its KV cache holds it), unless it is busy;
2. a node with the model loaded, the least loaded first;
3. any node, the least loaded first and, among equally loaded ones, the one with the most free memory.

"Busy" is `spill_at` requests in flight: past it a request goes to another node (which loads the
model) rather than waiting behind the others. More than `max_queue` requests in flight across the
cluster fail fast with `QueueFull`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import attrs

from ..errors import QueueFull, UnavailableError
from ..registry.names import ModelName

__all__ = ["NodeState", "Router", "chat_prefix_keys", "generate_prefix_keys", "model_key"]

PREFIX_CHARS = 256
"""How much of the rendered request a prefix key covers."""


def model_key(model: str) -> str:
    """One spelling per model: ``smollm2``, ``SmolLM2:latest`` and ``registry.ollama.ai/library/smollm2`` agree."""
    try:
        return ModelName.parse(model).display.lower()
    except Exception:  # a path to a GGUF file, or a name the engine will reject itself
        return model


def _key(model: str, text: str) -> str:
    digest = hashlib.sha256(f"{model_key(model)}\0{text[:PREFIX_CHARS]}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def _render(messages: Sequence[tuple[str, str]]) -> str:
    return "".join(json.dumps([role, content], ensure_ascii=False) + "\n" for role, content in messages)


def chat_prefix_keys(model: str, messages: Sequence[tuple[str, str]]) -> tuple[list[str], str]:
    """(keys to look up, longest first; the key this request records) for a chat of (role, content) pairs.

    A conversation's next turn looks up the prefixes that end at each earlier message, so it finds the
    node whose request ended there (the previous turn's whole request, or a shared system prompt).
    """
    lookups = [_key(model, _render(messages[:end])) for end in range(len(messages) - 1, 0, -1)]
    return list(dict.fromkeys(lookups)), _key(model, _render(messages))


def generate_prefix_keys(model: str, system: str | None, prompt: str) -> tuple[list[str], str]:
    key = _key(model, json.dumps([system or "", prompt], ensure_ascii=False))
    return [key], key


@attrs.define
class NodeState:
    """What the router knows of one node."""

    node_id: str
    loaded: set[str] = attrs.field(factory=set)  # model keys
    free_memory: int = 0
    in_flight: int = 0


class Router:
    """Chooses nodes and counts the requests in flight on each. Not thread-safe: use it from one event loop."""

    def __init__(self, *, max_queue: int = 512, spill_at: int = 4, prefix_capacity: int = 4096) -> None:
        if max_queue < 1 or spill_at < 1 or prefix_capacity < 1:
            raise ValueError("max_queue, spill_at and prefix_capacity must be positive")
        self.max_queue = max_queue
        self.spill_at = spill_at
        self.prefix_capacity = prefix_capacity
        self.nodes: dict[str, NodeState] = {}
        self._prefixes: OrderedDict[str, str] = OrderedDict()  # prefix key -> node id, least recently used first

    # -- what the nodes report

    def update(self, node_id: str, *, loaded: Iterable[str], free_memory: int) -> None:
        """A node's loaded models (names) and free memory (bytes); adds the node if it is new."""
        node = self.nodes.setdefault(node_id, NodeState(node_id))
        node.loaded = {model_key(m) for m in loaded}
        node.free_memory = free_memory

    def remove(self, node_id: str) -> None:
        """Forget a node (it died): nothing is routed to it again until it is `update`d."""
        self.nodes.pop(node_id, None)
        for key in [k for k, v in self._prefixes.items() if v == node_id]:
            del self._prefixes[key]

    @property
    def in_flight(self) -> int:
        return sum(node.in_flight for node in self.nodes.values())

    # -- routing

    def choose(self, model: str, lookups: Sequence[str] = ()) -> str:
        """The node for a request (without counting it); QueueFull or UnavailableError when there is none."""
        if not self.nodes:
            raise UnavailableError("no node of the cluster is available")
        if self.in_flight >= self.max_queue:
            raise QueueFull(f"{self.in_flight} requests are in flight across the cluster (max_queue={self.max_queue})")
        for key in lookups:
            node_id = self._prefixes.get(key)
            if node_id is not None and node_id in self.nodes and self.nodes[node_id].in_flight < self.spill_at:
                return node_id
        wanted = model_key(model)
        loaded = [n for n in self.nodes.values() if wanted in n.loaded and n.in_flight < self.spill_at]
        if loaded:
            return min(loaded, key=lambda n: (n.in_flight, -n.free_memory)).node_id
        # Loaded nowhere (or only where it is busy): where the most memory is free, among nodes with room.
        roomy = [n for n in self.nodes.values() if n.in_flight < self.spill_at] or list(self.nodes.values())
        return max(roomy, key=lambda n: (n.free_memory, -n.in_flight)).node_id

    def acquire(self, model: str, lookups: Sequence[str] = (), record: str | None = None) -> str:
        """Choose a node, count the request on it and remember it for the prefix `record`."""
        node_id = self.choose(model, lookups)
        node = self.nodes[node_id]
        node.in_flight += 1
        node.loaded.add(model_key(model))  # it will be, until the node's next report says otherwise
        if record is not None:
            self._prefixes[record] = node_id
            self._prefixes.move_to_end(record)
            while len(self._prefixes) > self.prefix_capacity:
                self._prefixes.popitem(last=False)
        return node_id

    def release(self, node_id: str) -> None:
        """A request on `node_id` ended."""
        node = self.nodes.get(node_id)
        if node is not None and node.in_flight > 0:
            node.in_flight -= 1
