"""localllm.ray: the Router on its own, and ClusterEngine on a real two-node local Ray cluster."""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import localllm
from localllm.ray.router import Router, chat_prefix_keys, generate_prefix_keys

GREEDY = {"temperature": 0, "num_predict": 12, "seed": 1}


# --------------------------------------------------------------------------- imports


def test_import_localllm_does_not_import_ray() -> None:
    code = "import sys, localllm; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_localllm_ray_without_ray_says_how_to_install() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "try:\n    import localllm.ray\nexcept ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install 'localllm[ray]'" in out


# --------------------------------------------------------------------------- the router, without Ray


def _router(**kwargs: Any) -> Router:
    router = Router(**kwargs)
    router.update("a", loaded=[], free_memory=4 << 30)
    router.update("b", loaded=[], free_memory=8 << 30)
    return router


def test_router_prefers_a_node_with_the_model_loaded() -> None:
    router = _router()
    router.update("a", loaded=["smollm2:latest"], free_memory=1 << 30)
    assert router.choose("smollm2") == "a"
    assert router.choose("SmolLM2:latest") == "a"
    assert router.choose("other") == "b"  # loaded nowhere: the most free memory


def test_router_sends_a_conversation_back_to_its_node() -> None:
    router = _router()
    router.update("a", loaded=["m"], free_memory=1)
    router.update("b", loaded=["m"], free_memory=1)
    first = [("system", "be brief"), ("user", "hello")]
    lookups, record = chat_prefix_keys("m", first)
    node = router.acquire("m", lookups, record)
    router.release(node)
    router.acquire("m")  # load the same node, so load alone would pick the other one
    second = [*first, ("assistant", "hi"), ("user", "how are you?")]
    lookups, record = chat_prefix_keys("m", second)
    assert router.choose("m", lookups) == node
    # another model's conversation with the same text is not the same prefix
    assert chat_prefix_keys("n", second)[0][0] not in lookups


def test_router_balances_by_load_and_spills_from_a_busy_node() -> None:
    router = _router(spill_at=2)
    # loaded nowhere: the most free memory; then where it is loaded, until that node holds spill_at requests
    assert [router.acquire("m") for _ in range(3)] == ["b", "b", "a"]
    router.release("b")
    router.release("b")
    router.update("a", loaded=["m"], free_memory=1)
    router.update("b", loaded=[], free_memory=1 << 40)
    assert router.acquire("m") == "a"  # loaded there, below spill_at
    assert router.acquire("m") == "b"  # "a" holds spill_at requests: to the other node, which loads it
    assert router.in_flight == 3


def test_router_queue_limit_and_lost_nodes() -> None:
    router = _router(max_queue=2)
    router.acquire("m", [], "k")
    router.acquire("m")
    with pytest.raises(localllm.QueueFull):
        router.choose("m")
    router.remove("a")
    router.remove("b")
    with pytest.raises(localllm.UnavailableError):
        router.choose("m")


def test_router_prefix_map_is_bounded() -> None:
    router = _router(prefix_capacity=3)
    for i in range(10):
        lookups, record = generate_prefix_keys("m", None, f"prompt {i}")
        router.release(router.acquire("m", lookups, record))
    assert len(router._prefixes) == 3


# --------------------------------------------------------------------------- a real two-node cluster


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # trio is covered by the one test that asks for it


NODE = {"num_cpus": 1, "object_store_memory": 100 << 20}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """Ray itself: a head and one more node on this machine."""
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    nodes.add_node(**NODE)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Any]:
    from localllm.ray import ClusterEngine

    # Not started here: its first call starts it, as an Engine's does.
    engine = ClusterEngine(engine_options={"home": tmp_path_factory.mktemp("cluster")}, max_queue=64)
    try:
        assert anyio.run(engine.list).models == []
        assert len(engine.nodes) == 2
        anyio.run(functools.partial(engine.create, "smollm2", from_=str(smollm2_path), node=engine.nodes[0]))
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def local_reply(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    async def run() -> str:
        async with localllm.Engine(tmp_path_factory.mktemp("local")) as engine:
            messages = [{"role": "user", "content": "Name a colour."}]
            reply = await engine.chat(str(smollm2_path), messages, options=GREEDY)
            return reply.message.content

    return anyio.run(run)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_chat_awaited_and_streamed_match_a_local_engine(cluster: Any, local_reply: str) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = await cluster.chat("smollm2", messages, options=GREEDY)
    assert isinstance(reply, localllm.ChatResponse)
    assert reply.message.content == local_reply
    chunks = [chunk async for chunk in cluster.chat("smollm2", messages, options=GREEDY)]
    assert chunks[-1].done and len(chunks) > 1
    assert "".join(c.message.content for c in chunks) == local_reply
    stream = await cluster.chat("smollm2", messages, options=GREEDY, stream=True)
    assert "".join([c.message.content async for c in stream]) == local_reply
    generated = await cluster.generate("smollm2", "The sky is", options=GREEDY)
    assert generated.response and generated.done
    # The frozen request goes to the node as it is.
    sent = await cluster.send(localllm.ChatRequest("smollm2", messages, options=GREEDY))
    assert sent.message.content == local_reply


def test_a_closed_cluster_engine_cannot_start_again() -> None:
    from localllm.ray import ClusterEngine

    engine = ClusterEngine()
    engine.close()  # never started: nothing to end, and Ray is not touched
    with pytest.raises(localllm.EngineClosed, match="closed"):
        engine.start()


async def test_next_turn_goes_to_the_node_that_served_the_first(cluster: Any) -> None:
    messages = [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Hi!"}]
    first = await cluster.chat("smollm2", messages, options=GREEDY)
    node = cluster.last_node
    messages += [{"role": "assistant", "content": first.message.content}, {"role": "user", "content": "And then?"}]
    second = await cluster.chat("smollm2", messages, options=GREEDY)
    assert cluster.last_node == node
    assert second.prompt_cached_count > 0
    loaded = await cluster.ps_by_node()
    assert [m.name for m in loaded[node].models] == ["smollm2:latest"]


async def test_a_node_that_lacks_the_model_gets_a_copy(cluster: Any) -> None:
    source, target = cluster.nodes
    await cluster.replicate("smollm2", source)
    try:
        await cluster.delete("smollm2", node=target)  # an earlier request may have copied it there already
    except localllm.ModelNotFound:
        pass
    copied = await cluster.replicate("smollm2", target)
    assert len(copied) == 2  # the GGUF and the config; each digest checked as it landed
    assert await cluster.replicate("smollm2", target) == []  # already there
    listed = {}
    for node in (source, target):
        models = (await cluster._call(node, "list")).models
        listed[node] = [(m.name, m.digest) for m in models]
        for digest in copied:
            assert await cluster._call(node, "has_blob", digest)
    assert listed[source] == listed[target] == [("smollm2:latest", listed[source][0][1])]
    assert [m.name for m in (await cluster.list()).models] == ["smollm2:latest"]


async def test_queue_limit_across_the_cluster(cluster: Any) -> None:
    cluster.router.max_queue = 2
    long = {"num_predict": 2000, "temperature": 0}
    streams = [
        cluster.chat("smollm2", [{"role": "user", "content": f"Count to {n}."}], options=long, stream=True)
        for n in (500, 600)
    ]
    try:
        for stream in streams:
            await stream.__anext__()  # both in flight
        with pytest.raises(localllm.QueueFull):
            await cluster.chat("smollm2", [{"role": "user", "content": "One more."}])
    finally:
        for stream in streams:
            stream.close()
        cluster.router.max_queue = 64
    assert cluster.router.in_flight == 0
    for _ in range(50):  # closing a stream cancels its request on the node, freeing the slot
        loaded = await cluster.ps()
        if all(m.active_requests == 0 for m in loaded.models):
            break
        await anyio.sleep(0.1)
    assert all(m.active_requests == 0 for m in loaded.models)


async def test_the_http_shim_serves_a_cluster(cluster: Any, local_reply: str) -> None:
    import httpx

    from localllm.http import create_app

    app = create_app(cluster)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        messages = [{"role": "user", "content": "Name a colour."}]
        body = {"model": "smollm2", "messages": messages, "stream": False, "options": GREEDY}
        reply = (await client.post("/api/chat", json=body)).json()
        assert reply["message"]["content"] == local_reply
        tags = (await client.get("/api/tags")).json()
        assert [m["name"] for m in tags["models"]] == ["smollm2:latest"]


async def test_embeddings_run_on_a_node(cluster: Any) -> None:
    embedded = await cluster.embed("smollm2", ["a colour", "a sound"], dimensions=16)
    assert [len(vector) for vector in embedded.embeddings] == [16, 16]
    assert cluster.router.in_flight == 0


async def test_images_go_to_a_node_with_the_request(cluster: Any, smollm2_path: Path, projector_path: Path) -> None:
    from pictures import png

    node = cluster.nodes[0]
    with pytest.raises(localllm.InvalidRequest, match="node"):
        await cluster.create_blob(smollm2_path)  # whose file? no one machine's store
    model = await cluster.create_blob(smollm2_path, node=node)
    projector = await cluster.create_blob(projector_path, node=node)
    await cluster.create("vis", files={"model.gguf": model, "mmproj.gguf": projector}, node=node)
    messages = [{"role": "user", "content": "Name a colour.", "images": [png((255, 0, 0))]}]
    with_image = await cluster.chat("vis", messages, options=GREEDY)
    without = await cluster.chat("vis", [{"role": "user", "content": "Name a colour."}], options=GREEDY)
    assert with_image.prompt_eval_count == without.prompt_eval_count + 16  # the projector's embeddings
    with pytest.raises(localllm.InvalidRequest, match="image"):
        await cluster.chat("vis", [{**messages[0], "images": [b"not an image"]}], options=GREEDY)


async def test_a_dead_engine_fails_its_requests_and_its_node_serves_again(cluster: Any) -> None:
    import ray

    for node in cluster.nodes:
        await cluster.replicate("smollm2", node)
    options = {"temperature": 0, "num_predict": 400}
    stream = cluster.chat("smollm2", [{"role": "user", "content": "Tell me a long story."}], options=options)
    chunks = stream.__aiter__()
    await chunks.__anext__()
    doomed = cluster.last_node
    survivor = next(node for node in cluster.nodes if node != doomed)
    ray.kill(cluster.actor(doomed))  # as llama.cpp aborting or the OOM killer would end it
    with pytest.raises(localllm.RunnerError, match="died"):
        async for _chunk in chunks:
            pass
    assert doomed not in cluster.nodes
    assert cluster.router.in_flight == 0
    # The next request looks at the cluster again: the node is alive, so it gets a new engine.
    reply = await cluster.chat("smollm2", [{"role": "user", "content": "Hello?"}], options=GREEDY)
    assert reply.message.content
    assert sorted([doomed, survivor]) == cluster.nodes
    # ... on the same store: once the model is stored only there, it is served from there.
    await cluster.delete("smollm2", node=survivor)
    assert await cluster.replicate("smollm2", doomed) == []  # still in its store
    shown = await cluster.show("smollm2")
    assert shown.details.family
    reply = await cluster.chat("smollm2", [{"role": "user", "content": "Name a colour."}], options=GREEDY)
    assert reply.message.content
    assert doomed in await cluster.ps_by_node()
    assert cluster.router.in_flight == 0


async def test_a_node_that_leaves_the_cluster_is_not_routed_to_again(cluster: Any, ray_cluster: Any) -> None:
    import ray

    before = set(cluster.nodes)
    leaving = ray_cluster.add_node(**NODE)
    ray_cluster.wait_for_nodes()
    cluster._refreshed = 0.0
    await cluster.list()  # looks at the cluster again: the new node gets an engine
    (joined,) = set(cluster.nodes) - before
    ray_cluster.remove_node(leaving)
    deadline = time.monotonic() + 120
    while any(n["NodeID"] == joined and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "Ray did not notice the node leave"
        await anyio.sleep(0.1)
    cluster._refreshed = 0.0
    await cluster.list()  # its engine is gone with it, and its node is not given a new one
    assert set(cluster.nodes) == before
    reply = await cluster.chat("smollm2", [{"role": "user", "content": "Hello?"}], options=GREEDY)
    assert reply.message.content and cluster.last_node in before
    cluster._refreshed = 0.0
    await cluster.list()
    assert set(cluster.nodes) == before
