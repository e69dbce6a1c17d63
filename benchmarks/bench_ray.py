"""8 concurrent chats on a local Ray cluster: one node against two, each node limited to 1 CPU.

SmolLM2 135M Q4_1, greedy, 64 tokens per reply, each node's engine with 4 slots and 1 thread.
Reports the aggregate tokens/s and the p95 time to first token. On one machine the nodes share its
cores, so two nodes measure the routing and its overhead as much as added capacity.

    nox -s bench -- benchmarks/bench_ray.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import anyio
import ray
from common import smollm2_path
from ray.cluster_utils import Cluster

from localllm.ray import ClusterEngine

CHATS = 8
TOKENS = 64


async def measure(cluster: ClusterEngine) -> tuple[float, float]:
    options = {"temperature": 0, "num_predict": TOKENS, "num_thread": 1}
    for node in cluster.nodes:  # the model on every node, loaded: time the serving, not the copying
        await cluster.replicate("smollm2", node)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        start = time.perf_counter()
        first = None
        async for chunk in cluster.chat(
            "smollm2", [{"role": "user", "content": f"Tell me fact {i}."}], options=options
        ):
            if first is None:
                first = time.perf_counter() - start
            if chunk.done:
                tokens += chunk.eval_count or 0
        ttfts.append(first or 0.0)

    async with anyio.create_task_group() as group:  # warm-up: load the model where requests go
        for i in range(CHATS):
            group.start_soon(one, i)
    ttfts.clear()
    tokens = 0
    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for i in range(CHATS):
            group.start_soon(one, 100 + i)
    elapsed = time.perf_counter() - start
    return tokens / elapsed, statistics.quantiles(ttfts, n=20)[-1]


def run(nodes: int) -> tuple[float, float]:
    args = {"num_cpus": 1, "object_store_memory": 100 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(**args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as home:
            engine = ClusterEngine(engine_options={"home": home, "num_parallel": 4})

            async def main() -> tuple[float, float]:
                async with engine:
                    await engine.create("smollm2", from_=str(smollm2_path()), node=engine.nodes[0])
                    return await measure(engine)

            return anyio.run(main)
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    print(f"{CHATS} concurrent chats, {TOKENS} tokens each, SmolLM2 135M Q4_1")
    for nodes in (1, 2):
        rate, p95 = run(nodes)
        print(f"{nodes} node(s): {rate:7.1f} tokens/s aggregate, p95 time to first token {p95 * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
