"""Memory estimates from real GGUF files, and GPU layer planning on injected devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from localllm.errors import InsufficientMemory, InvalidOptions
from localllm.gguf.inspect import GGUFInfo, read_info
from localllm.scheduler.devices import DeviceInventory, GpuDevice, SystemMemory
from localllm.scheduler.memory import (
    GPU_OVERHEAD_ENV,
    GPU_RESERVE,
    MemoryEstimate,
    estimate_memory,
    format_bytes,
    plan_layers,
)

pytestmark = pytest.mark.fast

MiB = 1024**2
GiB = 1024**3


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> GGUFInfo:
    return read_info(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> GGUFInfo:
    return read_info(gemma3_path)


# -- estimate on real files ----------------------------------------------------------------------------------------


def test_weights_add_up_to_the_files_tensor_bytes(smollm2: GGUFInfo) -> None:
    est = estimate_memory(smollm2, num_ctx=2048, num_parallel=1)
    file_bytes = sum(t.n_bytes for t in smollm2.tensors)
    assert est.weights_bytes == file_bytes
    assert est.block_count == 30
    assert list(est.layer_weights) == list(smollm2.layer_bytes().values())
    # SmolLM2's output is tied to token_embd: offloading it copies the embedding to the GPU, the CPU shares it.
    token_embd = smollm2.tensor("token_embd.weight")
    output_norm = smollm2.tensor("output_norm.weight")
    assert token_embd is not None and output_norm is not None and smollm2.tensor("output.weight") is None
    assert est.output_bytes == smollm2.output_bytes() == output_norm.n_bytes + token_embd.n_bytes
    assert est.output_cpu_bytes == output_norm.n_bytes


def test_kv_cache_follows_the_formula(smollm2: GGUFInfo) -> None:
    # llama: 30 layers, 3 KV heads, head dim 576 / 9 = 64 for K and V, f16 = 2 bytes.
    n_layer, n_head_kv, head_dim = 30, 3, 576 // 9
    for num_ctx, num_parallel in ((2048, 1), (2048, 4), (4096, 2)):
        est = estimate_memory(smollm2, num_ctx=num_ctx, num_parallel=num_parallel)
        per_layer = num_ctx * num_parallel * (head_dim + head_dim) * n_head_kv * 2
        assert est.layer_kv == (per_layer,) * n_layer
        assert est.kv_bytes == per_layer * n_layer
    # 2048 x 1 is what llama.cpp reports as "KV buffer size = 45.00 MiB".
    assert estimate_memory(smollm2, num_ctx=2048, num_parallel=1).kv_bytes == 45 * MiB


def test_quantized_kv_cache(smollm2: GGUFInfo) -> None:
    f16 = estimate_memory(smollm2, num_ctx=2048, num_parallel=1)
    q8 = estimate_memory(smollm2, num_ctx=2048, num_parallel=1, kv_cache_type="q8_0")
    q4 = estimate_memory(smollm2, num_ctx=2048, num_parallel=1, kv_cache_type="q4_0")
    assert q8.kv_bytes * 2 * 32 == f16.kv_bytes * 34
    assert q4.kv_bytes * 2 * 32 == f16.kv_bytes * 18
    with pytest.raises(InvalidOptions, match="KV cache type"):
        estimate_memory(smollm2, num_ctx=2048, num_parallel=1, kv_cache_type="q3_k")


def test_context_is_rounded_like_llama_cpp(smollm2: GGUFInfo) -> None:
    est = estimate_memory(smollm2, num_ctx=1000, num_parallel=1)
    assert est.kv_cells == 1024  # llama.cpp pads every sequence to 256 cells


def test_compute_buffer_is_dominated_by_logits(smollm2: GGUFInfo) -> None:
    est = estimate_memory(smollm2, num_ctx=8192, num_parallel=1)
    # llama.cpp reports "CPU compute buffer size = 98.25 MiB": logits of 512 tokens x 49152 + activations.
    assert est.graph_cpu == 4 * 512 * (49152 + 2 * 576) == int(98.25 * MiB)
    small = estimate_memory(smollm2, num_ctx=256, num_parallel=1)
    assert small.num_ubatch == 256  # the batch never exceeds the context
    assert est.output_buffer == 4 * 49152
    assert est.graph_gpu_partial >= est.graph_gpu_full


def test_gemma3_sliding_window_layers_get_a_small_cache(gemma3: GGUFInfo) -> None:
    est = estimate_memory(gemma3, num_ctx=8192, num_parallel=1)
    # 18 layers, every 6th global; 1 KV head of 256 + 256 dims; window 512 + 512 micro-batch = 1024 cells.
    row = (256 + 256) * 1 * 2
    global_layers = {5, 11, 17}
    expected = tuple(8192 * row if il in global_layers else 1024 * row for il in range(18))
    assert est.layer_kv == expected
    assert est.kv_bytes == 39 * MiB  # llama.cpp: 24 MiB non-SWA + 15 MiB SWA
    full = estimate_memory(gemma3, num_ctx=8192, num_parallel=1, swa_full=True)
    assert full.kv_bytes == 18 * 8192 * row
    parallel = estimate_memory(gemma3, num_ctx=2048, num_parallel=4)
    assert parallel.swa_cells == 4 * 1024  # one window per sequence
    # Tied embeddings: a GPU needs its own copy of token_embd for the output layer; the CPU does not.
    token_embd = gemma3.tensor("token_embd.weight")
    assert token_embd is not None
    assert est.output_bytes == est.output_cpu_bytes + token_embd.n_bytes


def test_encoder_models_have_no_kv_cache(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny-bert.gguf"
    embd, ff, layers, vocab = 32, 64, 2, 100
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_context_length(512)
    writer.add_embedding_length(embd)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(layers)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((vocab, embd), dtype=np.float16))
    for il in range(layers):
        writer.add_tensor(f"blk.{il}.ffn_up.weight", np.zeros((ff, embd), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    est = estimate_memory(read_info(path), num_ctx=512, num_parallel=2, flash_attention=True)
    assert est.kv_bytes == 0 and est.kv_cells == 0
    assert est.layer_weights == (ff * embd * 2,) * layers
    # No logits: an f16 mask over the batch plus one layer's activations (llama.cpp measures within 1%).
    assert est.graph_cpu == 2 * 512 * 512 + 4 * 512 * (ff + 3 * embd)


# -- planning on injected devices --------------------------------------------------------------------------------


def synthetic(
    *,
    layers: int = 10,
    layer: int = 100 * MiB,
    kv: int = 0,
    output: int = 200 * MiB,
    graph_full: int = 300 * MiB,
    graph_partial: int = 400 * MiB,
    graph_cpu: int = 300 * MiB,
    input_bytes: int = 50 * MiB,
) -> MemoryEstimate:
    return MemoryEstimate(
        architecture="llama",
        num_ctx=2048,
        num_parallel=1,
        num_batch=512,
        num_ubatch=512,
        kv_cache_type="f16",
        kv_cells=2048,
        swa_cells=0,
        layer_weights=(layer - kv,) * layers,
        layer_kv=(kv,) * layers,
        input_bytes=input_bytes,
        output_bytes=output,
        output_cpu_bytes=output,
        graph_cpu=graph_cpu,
        graph_cpu_offloaded=1 * MiB,
        graph_gpu_full=graph_full,
        graph_gpu_partial=graph_partial,
        output_buffer=1 * MiB,
    )


def gpu(index: int, free: int, total: int | None = None) -> GpuDevice:
    return GpuDevice(index=index, name=f"Test GPU {index}", total_memory=total or max(free, 8 * GiB), free_memory=free)


RAM = SystemMemory(total=64 * GiB, free=32 * GiB)


@pytest.fixture(autouse=True)
def _no_env_overhead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPU_OVERHEAD_ENV, raising=False)


def test_one_8gb_gpu_takes_the_whole_model() -> None:
    est = synthetic(kv=10 * MiB)
    plan = plan_layers(est, DeviceInventory(gpus=(gpu(0, 8 * GiB),), system=RAM))
    assert plan.gpu_layers == 11 and plan.fits_fully and plan.output_on_gpu
    assert plan.layers_per_device == {0: 11}
    assert plan.tensor_split is None and plan.main_gpu == 0
    assert plan.bytes_per_device[0] == 10 * 100 * MiB + 200 * MiB + 300 * MiB  # layers + output + full graph
    assert plan.bytes_per_device["cpu"] == 50 * MiB + 1 * MiB + 1 * MiB  # embeddings, logits, host graph
    assert plan.vram_bytes == plan.bytes_per_device[0]
    assert plan.total_bytes == plan.vram_bytes + plan.cpu_bytes


def test_two_uneven_gpus_split_by_room() -> None:
    est = synthetic(layer=1 * GiB, output=1 * GiB, graph_full=GiB // 2, graph_partial=GiB // 2)
    gpus = (gpu(0, 8 * GiB), gpu(1, 6 * GiB))
    plan = plan_layers(est, DeviceInventory(gpus=gpus, system=RAM), reserve=0)
    # Neither GPU holds 10 + 1 GiB alone. Rooms 7.5 and 5.5 GiB: layers go to whichever has more room left
    # (GPU 0 on ties, being main), so GPU 0 takes 6 layers, GPU 1 takes 4, and GPU 0 also holds the output.
    assert plan.layers_per_device == {0: 7, 1: 4}
    assert plan.gpu_layers == 11 and plan.fits_fully
    assert plan.tensor_split == (7 / 11, 4 / 11)
    assert plan.bytes_per_device[0] == 7 * GiB + GiB // 2
    assert plan.bytes_per_device[1] == 4 * GiB + GiB // 2


def test_a_small_gpu_gets_part_of_the_model() -> None:
    est = synthetic(layers=30, layer=100 * MiB)
    plan = plan_layers(est, DeviceInventory(gpus=(gpu(0, 2 * GiB),), system=RAM))
    # room = 2048 MiB free - 457 MiB reserve - 400 MiB split-model graph = 1191 MiB -> 11 layers of 100 MiB.
    expected = (2 * GiB - GPU_RESERVE - 400 * MiB) // (100 * MiB)
    assert expected == 11
    assert plan.gpu_layers == expected and not plan.fits_fully and not plan.output_on_gpu
    assert plan.bytes_per_device[0] == 11 * 100 * MiB + 400 * MiB
    # The CPU keeps the 19 first layers, the output layer, the embeddings and its graph.
    assert plan.bytes_per_device["cpu"] == 19 * 100 * MiB + 200 * MiB + 50 * MiB + 300 * MiB + 1 * MiB


def test_overhead_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    est = synthetic(layers=30)
    inventory = DeviceInventory(gpus=(gpu(0, 2 * GiB),), system=RAM)
    monkeypatch.setenv(GPU_OVERHEAD_ENV, str(300 * MiB))
    assert plan_layers(est, inventory).gpu_layers == 8  # (1191 - 300) // 100
    monkeypatch.setenv(GPU_OVERHEAD_ENV, "lots")
    with pytest.raises(InvalidOptions, match=GPU_OVERHEAD_ENV):
        plan_layers(est, inventory)


def test_nothing_fits_anywhere() -> None:
    est = synthetic(layers=40, layer=1 * GiB)
    inventory = DeviceInventory(gpus=(gpu(0, 4 * GiB),), system=SystemMemory(total=16 * GiB, free=12 * GiB))
    with pytest.raises(InsufficientMemory) as caught:
        plan_layers(est, inventory)
    message = str(caught.value)
    assert "GiB" in message and "bytes" in message
    assert "12.0 GiB" in message and "4.0 GiB" in message  # what is free, human-readable
    assert f"{inventory.system.free + 4 * GiB:,} bytes" in message  # available, exact
    # CPU only too:
    with pytest.raises(InsufficientMemory, match="all in system memory"):
        plan_layers(est, DeviceInventory(gpus=(), system=SystemMemory(total=16 * GiB, free=12 * GiB)))


def test_num_gpu_zero_means_cpu() -> None:
    est = synthetic()
    plan = plan_layers(est, DeviceInventory(gpus=(gpu(0, 8 * GiB),), system=RAM), num_gpu=0)
    assert plan.gpu_layers == 0 and plan.vram_bytes == 0 and plan.layers_per_device == {}
    assert plan.tensor_split is None and not plan.fits_fully
    assert plan.total_bytes == plan.cpu_bytes == est.total_bytes


def test_no_gpus_means_cpu() -> None:
    est = synthetic()
    plan = plan_layers(est, DeviceInventory(gpus=(), system=RAM))
    assert plan.gpu_layers == 0 and plan.bytes_per_device == {"cpu": est.total_bytes}


def test_num_gpu_caps_the_layers() -> None:
    est = synthetic()
    plan = plan_layers(est, DeviceInventory(gpus=(gpu(0, 8 * GiB),), system=RAM), num_gpu=4)
    assert plan.gpu_layers == 4 and not plan.output_on_gpu and not plan.fits_fully
    assert plan.bytes_per_device[0] == 4 * 100 * MiB + 400 * MiB
    capped = plan_layers(est, DeviceInventory(gpus=(gpu(0, 8 * GiB),), system=RAM), num_gpu=10)
    assert capped.gpu_layers == 10 and not capped.output_on_gpu  # every repeating layer, not the output
    assert plan_layers(est, DeviceInventory(gpus=(gpu(0, 8 * GiB),), system=RAM), num_gpu=99).fits_fully


def test_main_gpu_is_used_first() -> None:
    est = synthetic()
    gpus = (gpu(0, 8 * GiB), gpu(1, 8 * GiB))
    plan = plan_layers(est, DeviceInventory(gpus=gpus, system=RAM), main_gpu=1)
    assert plan.layers_per_device == {1: 11} and plan.main_gpu == 1
    assert plan.tensor_split == (0.0, 1.0)
    default = plan_layers(est, DeviceInventory(gpus=gpus, system=RAM))
    assert default.layers_per_device == {0: 11} and default.tensor_split == (1.0, 0.0)
    with pytest.raises(InvalidOptions, match="main_gpu 5"):
        plan_layers(est, DeviceInventory(gpus=gpus, system=RAM), main_gpu=5)


def test_a_main_gpu_too_small_falls_back_to_one_that_fits() -> None:
    est = synthetic()
    gpus = (gpu(0, 1 * GiB), gpu(1, 8 * GiB))
    plan = plan_layers(est, DeviceInventory(gpus=gpus, system=RAM), main_gpu=0)
    assert plan.layers_per_device == {1: 11} and plan.main_gpu == 1


def test_callable_inventory_and_all_free() -> None:
    est = synthetic(layers=30)
    busy = DeviceInventory(gpus=(gpu(0, 1 * GiB, total=8 * GiB),), system=SystemMemory(total=8 * GiB, free=GiB))
    with pytest.raises(InsufficientMemory):
        plan_layers(est, lambda: busy)
    assert plan_layers(est, busy.with_all_free()).fits_fully


def test_plan_for_real_model_on_a_small_gpu(gemma3: GGUFInfo) -> None:
    est = estimate_memory(gemma3, num_ctx=8192, num_parallel=1)
    roomy = plan_layers(est, DeviceInventory(gpus=(gpu(0, 8 * GiB),), system=RAM))
    assert roomy.gpu_layers == 19 and roomy.fits_fully
    tight = plan_layers(
        est, DeviceInventory(gpus=(gpu(0, GPU_RESERVE + est.graph_gpu_partial + 60 * MiB),), system=RAM)
    )
    assert 0 < tight.gpu_layers < 18 and not tight.output_on_gpu


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(45 * MiB) == "45.0 MiB"
    assert format_bytes(int(7.8 * GiB)) == "7.8 GiB"
    assert format_bytes(3 * 1024**4) == "3.0 TiB"
