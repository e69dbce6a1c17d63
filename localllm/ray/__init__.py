"""The Engine API across a Ray cluster: one engine per node, requests routed to the node that suits them.

    from localllm.ray import ClusterEngine

    async with ClusterEngine("auto", engine_options={"num_parallel": 4}) as cluster:
        await cluster.create("smollm2", from_="/models/SmolLM2.gguf")
        async for chunk in cluster.chat("smollm2", [{"role": "user", "content": "hi"}]):
            print(chunk.message.content, end="")

Needs Ray: ``pip install 'localllm[ray]'``.
"""

try:
    import ray as _ray  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("localllm.ray needs Ray: pip install 'localllm[ray]'") from exc

from .cluster import ClusterEngine
from .node import NodeEngine
from .router import Router

__all__ = ["ClusterEngine", "NodeEngine", "Router"]
