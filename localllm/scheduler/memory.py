"""How much memory a model needs, read from its GGUF alone, and where its layers should go.

`estimate_memory` follows what llama.cpp allocates when it loads a model and creates a context:

- **weights**: the bytes of every tensor, grouped per repeating layer (`blk.N.*`), the output layer
  (`output_norm` + `output`, or the token embedding when the output is tied to it), and the rest
  (token embedding and friends), which llama.cpp always keeps in host memory;
- **KV cache**: per layer, cells x (K head dim + V head dim) x KV heads x bytes per element. Cells are
  `num_ctx * num_parallel` rounded the way llama.cpp rounds them (to 256 per sequence); layers that use a
  sliding window only get `sliding_window + n_ubatch` cells per sequence (rounded to 256) unless the
  context asks for a full-size SWA cache;
- **compute graph**: the scratch buffer llama.cpp reserves for the worst-case micro-batch. Its peak is
  usually the logits of a full micro-batch (`4 * n_ubatch * n_vocab`), or the attention scores when flash
  attention is off and the context is long. Encoder-only models (BERT and kin) have no KV cache and no
  logits: their graph is one layer's activations over the batch.

- **projector** (vision/audio models): the projector file's bytes plus its compute buffer (`projector_memory`),
  on the first GPU that holds layers (libmtmd runs the encoder on the GPU when there is one), else on the CPU.

`plan_layers` then places layers on GPUs the way Ollama does: repeating layers from the last one down,
each on the GPU with the most room left, the output layer only once every repeating layer is on a GPU,
and whatever does not fit stays on the CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, Protocol, cast

import attrs
from attrs import validators as v

from localllm.errors import InsufficientMemory, InvalidOptions, InvalidRequest
from localllm.scheduler.devices import DeviceInventory, GpuDevice, InventorySource, resolve_inventory

MiB = 1024 * 1024

GPU_RESERVE = 457 * MiB
"""Default bytes left free on every GPU for the driver and the CUDA context (Ollama's minimum for CUDA)."""

GPU_OVERHEAD_ENV = "LOCALLLM_GPU_OVERHEAD"
"""Environment variable: extra bytes to keep free on every GPU."""

KV_CACHE_TYPES: dict[str, tuple[int, int]] = {
    # name: (bytes per block, elements per block)
    "f32": (4, 1),
    "f16": (2, 1),
    "bf16": (2, 1),
    "q8_0": (34, 32),
    "q4_0": (18, 32),
    "q4_1": (20, 32),
    "q5_0": (22, 32),
    "q5_1": (24, 32),
    "iq4_nl": (18, 32),
}
"""KV cache element types llama.cpp accepts, with their storage size."""

# Which layers use the sliding window when the GGUF does not say (`<arch>.attention.sliding_window_pattern`):
# (n, dense_first). With dense_first False, every n-th layer (the last of each group) attends globally; with
# True the first of each group does. These mirror the defaults llama.cpp's model loaders use.
_SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "cohere2": (4, False),
    "gpt-oss": (2, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "llama4": (4, False),
    "smallthinker": (4, True),
}

# Encoder-only architectures: llama.cpp gives them no KV cache and their graph ends in pooled embeddings, not
# logits over the vocabulary.
_ENCODER_ONLY = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "eurobert",
        "t5encoder",
        "gemma-embedding",
    }
)

_BLOCK = re.compile(r"^blk\.(\d+)\.")

_CELL_PAD = 256  # llama.cpp pads the context, each sequence's share of it, and the SWA cache to 256 cells


# -- what the estimate reads from a GGUF --------------------------------------------------------------------------


class TensorLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...

    @property
    def n_bytes(self) -> int: ...


class ModelInfoLike(Protocol):
    """What `estimate_memory` needs from a parsed GGUF (`localllm.gguf.inspect.GGUFInfo` fits)."""

    @property
    def architecture(self) -> str: ...

    @property
    def tensors(self) -> Sequence[TensorLike]: ...

    def get(self, key: str, default: Any = None) -> Any: ...


# -- results -----------------------------------------------------------------------------------------------------


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in value)


_non_negative = [v.instance_of(int), v.ge(0)]
_positive = [v.instance_of(int), v.ge(1)]
_int_tuple = v.deep_iterable(v.and_(v.instance_of(int), v.ge(0)), v.instance_of(tuple))


@attrs.frozen
class MemoryEstimate:
    """Bytes a model needs once loaded with given context options, broken down the way llama.cpp allocates them."""

    architecture: str = attrs.field(validator=v.instance_of(str))
    num_ctx: int = attrs.field(validator=_positive)
    num_parallel: int = attrs.field(validator=_positive)
    num_batch: int = attrs.field(validator=_positive)
    num_ubatch: int = attrs.field(validator=_positive)
    kv_cache_type: str = attrs.field(validator=v.in_(KV_CACHE_TYPES))
    kv_cells: int = attrs.field(validator=_non_negative)
    """KV cells of a full-attention layer, all sequences together."""
    swa_cells: int = attrs.field(validator=_non_negative)
    """KV cells of a sliding-window layer, all sequences together (0 when the model has none)."""
    layer_weights: tuple[int, ...] = attrs.field(converter=_ints, validator=_int_tuple)
    """Bytes of the tensors of each repeating layer (`blk.N.*`)."""
    layer_kv: tuple[int, ...] = attrs.field(converter=_ints, validator=_int_tuple)
    """KV cache (or recurrent state) bytes of each repeating layer."""
    input_bytes: int = attrs.field(validator=_non_negative)
    """Tensors llama.cpp keeps in host memory whatever is offloaded (token embedding, ...)."""
    output_bytes: int = attrs.field(validator=_non_negative)
    """Bytes the output layer takes on a GPU (a tied output is copied from the token embedding)."""
    output_cpu_bytes: int = attrs.field(validator=_non_negative)
    """Bytes the output layer adds to host memory when it is not offloaded."""
    graph_cpu: int = attrs.field(validator=_non_negative)
    """Compute buffer in host memory when some layers (or the output) run on the CPU."""
    graph_cpu_offloaded: int = attrs.field(validator=_non_negative)
    """Compute buffer left in host memory when every layer and the output are on GPUs."""
    graph_gpu_full: int = attrs.field(validator=_non_negative)
    """Compute buffer on a GPU that holds every layer and the output."""
    graph_gpu_partial: int = attrs.field(validator=_non_negative)
    """Compute buffer on each GPU when the model is split (includes room to run CPU-resident matmuls there)."""
    output_buffer: int = attrs.field(validator=_non_negative)
    """Host buffer for the logits llama.cpp hands back (one row per sequence)."""
    projector_bytes: int = attrs.field(default=0, validator=_non_negative)
    """A multimodal projector's weights and compute buffer (0 without one): see `projector_memory`."""

    @layer_kv.validator
    def _same_length(self, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]) -> None:
        if len(value) != len(self.layer_weights):
            raise ValueError(f"layer_kv has {len(value)} entries but layer_weights has {len(self.layer_weights)}")

    @property
    def block_count(self) -> int:
        return len(self.layer_weights)

    @property
    def weights_bytes(self) -> int:
        """All tensor bytes, as llama.cpp loads them for the CPU."""
        return sum(self.layer_weights) + self.input_bytes + self.output_cpu_bytes

    @property
    def kv_bytes(self) -> int:
        return sum(self.layer_kv)

    @property
    def total_bytes(self) -> int:
        """Everything on the CPU: weights, KV cache, compute buffer and output buffer."""
        return self.weights_bytes + self.kv_bytes + self.graph_cpu + self.output_buffer + self.projector_bytes

    def layer_bytes(self, index: int) -> int:
        """Weights plus KV cache of repeating layer `index`: what offloading it moves to a GPU."""
        return self.layer_weights[index] + self.layer_kv[index]


@attrs.frozen
class LayerPlan:
    """Where a model's layers go: pass `gpu_layers` (as n_gpu_layers), `main_gpu` and `tensor_split` to llama.cpp.

    The plan keeps the output layer on the CPU until every repeating layer is on a GPU, as Ollama does.
    llama.cpp counts n_gpu_layers from the other end (the output layer is the first one it offloads), so
    for a partial plan it really puts the output plus `gpu_layers - 1` repeating layers on the GPU. The
    split-model compute budget already holds a copy of the output matrix, so the byte totals cover both.
    """

    gpu_layers: int = attrs.field(validator=_non_negative)
    """Layers on GPUs, counting the output layer as one (block_count + 1 = everything)."""
    layers_per_device: dict[int, int] = attrs.field(validator=v.instance_of(dict))
    """GPU index -> layers placed there (GPUs with none are left out)."""
    bytes_per_device: dict[int | str, int] = attrs.field(validator=v.instance_of(dict))
    """GPU index, or "cpu" -> bytes expected there."""
    tensor_split: tuple[float, ...] | None = attrs.field(
        validator=v.optional(v.deep_iterable(v.instance_of(float), v.instance_of(tuple)))
    )
    """Fractions of the offloaded layers per GPU, indexed by GPU index; None unless the inventory has
    several GPUs (then a GPU left out gets 0.0)."""
    main_gpu: int = attrs.field(validator=_non_negative)
    fits_fully: bool = attrs.field(validator=v.instance_of(bool))
    """True when every repeating layer and the output layer are on GPUs."""
    output_on_gpu: bool = attrs.field(validator=v.instance_of(bool))
    total_bytes: int = attrs.field(validator=_non_negative)
    vram_bytes: int = attrs.field(validator=_non_negative)

    @property
    def cpu_bytes(self) -> int:
        return self.bytes_per_device.get("cpu", 0)


# -- estimate ----------------------------------------------------------------------------------------------------


def estimate_memory(
    info: ModelInfoLike,
    *,
    num_ctx: int,
    num_parallel: int,
    kv_cache_type: str = "f16",
    num_batch: int = 512,
    num_ubatch: int | None = None,
    flash_attention: bool = True,
    swa_full: bool = False,
) -> MemoryEstimate:
    """Estimate the memory a model needs with `num_parallel` sequences of `num_ctx` tokens each.

    `num_ubatch` defaults to `num_batch` (the runner uses one micro-batch per batch). `flash_attention`
    is llama.cpp's default ("auto" turns it on wherever the backend supports it). `swa_full` must match the
    context's `swa_full` flag: llama.cpp's own default is a full-size cache on sliding-window layers, the
    runner asks for the small one.
    """
    for name, value in (("num_ctx", num_ctx), ("num_parallel", num_parallel), ("num_batch", num_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidOptions(f"{name} must be a positive integer, got {value!r}")
    if num_ubatch is not None and (not isinstance(num_ubatch, int) or num_ubatch < 1):
        raise InvalidOptions(f"num_ubatch must be a positive integer, got {num_ubatch!r}")
    kv_type = str(kv_cache_type).lower()
    if kv_type not in KV_CACHE_TYPES:
        raise InvalidOptions(f"unknown KV cache type {kv_cache_type!r}; use one of {', '.join(KV_CACHE_TYPES)}")

    arch = _architecture(info)
    hp = _Hyper.read(info, arch)
    encoder = arch in _ENCODER_ONLY

    # Context cells as llama.cpp sizes them (one stream per sequence).
    n_ctx = _pad(num_ctx * num_parallel, _CELL_PAD)
    cells_per_seq = _pad(n_ctx // num_parallel, _CELL_PAD)
    n_ctx = cells_per_seq * num_parallel
    n_batch = num_batch if encoder else min(num_batch, n_ctx)  # a causal batch never exceeds the context
    n_ubatch = min(num_ubatch if num_ubatch is not None else num_batch, n_batch)
    if encoder:
        n_ctx = cells_per_seq = 0  # no KV cache: each batch attends only to itself

    swa_layers = _swa_layers(info, arch, hp.block_count) if hp.sliding_window > 0 and not encoder else frozenset()
    if swa_layers and not swa_full:
        swa_per_seq = _pad(min(cells_per_seq, hp.sliding_window + n_ubatch), _CELL_PAD)
    else:
        swa_per_seq = cells_per_seq
    swa_cells = swa_per_seq * num_parallel if swa_layers else 0

    block_bytes, input_bytes, output_bytes, output_cpu_bytes, output_weight = _group_tensors(info, hp.block_count)

    layer_kv = []
    for il in range(hp.block_count):
        n_head_kv = hp.head_count_kv[il]
        if encoder:
            layer_kv.append(0)
        elif n_head_kv > 0:
            is_swa = il in swa_layers
            key_dim = hp.key_length_swa if is_swa else hp.key_length
            value_dim = hp.value_length_swa if is_swa else hp.value_length
            cells = swa_cells if is_swa else n_ctx
            layer_kv.append(
                cells * (_row_bytes(kv_type, key_dim * n_head_kv) + _row_bytes(kv_type, value_dim * n_head_kv))
            )
        else:
            layer_kv.append(_recurrent_state_bytes(info, arch) * num_parallel)

    graph_cpu, graph_offloaded, graph_full, graph_partial = _graph_sizes(
        hp,
        n_ubatch=n_ubatch,
        n_kv=n_ubatch if encoder else cells_per_seq,
        flash_attention=flash_attention,
        output_weight=0 if encoder else output_weight,
        logits=not encoder,
    )

    return MemoryEstimate(
        architecture=arch,
        num_ctx=num_ctx,
        num_parallel=num_parallel,
        num_batch=n_batch,
        num_ubatch=n_ubatch,
        kv_cache_type=kv_type,
        kv_cells=n_ctx,
        swa_cells=swa_cells,
        layer_weights=tuple(block_bytes),
        layer_kv=tuple(layer_kv),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        output_cpu_bytes=output_cpu_bytes,
        graph_cpu=graph_cpu,
        graph_cpu_offloaded=graph_offloaded,
        graph_gpu_full=graph_full,
        graph_gpu_partial=graph_partial,
        output_buffer=4 * (hp.vocab_size + (hp.embedding_length if encoder else 0)) * num_parallel,
    )


def estimate_file_memory(path: str | os.PathLike[str], **options: Any) -> MemoryEstimate:
    """`estimate_memory` for a GGUF file on disk (reads its header and tensor table only)."""
    from localllm.gguf.inspect import read_info

    return estimate_memory(read_info(path), **options)


PROJECTOR_GRAPH_FLOOR = 32 * MiB


def projector_memory(info: ModelInfoLike, file_size: int) -> int:
    """Bytes a multimodal projector takes once libmtmd loads it: its file plus a compute buffer.

    The rule: the file's size (its weights, loaded as stored), plus 32 MiB and 10% of the file for the encoder's
    scratch buffer, plus the attention scores of one image (patches^2 x heads x 4 bytes, with patches =
    (image_size / patch_size)^2), which dominate for encoders of large images without flash attention.
    """
    image_size = _int(info.get("clip.vision.image_size"))
    patch_size = _int(info.get("clip.vision.patch_size"))
    heads = _int(info.get("clip.vision.attention.head_count"))
    patches = (image_size // patch_size) ** 2 if image_size > 0 and patch_size > 0 else 0
    return file_size + PROJECTOR_GRAPH_FLOOR + file_size // 10 + patches * patches * max(heads, 1) * 4


def _pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _row_bytes(kv_type: str, elements: int) -> int:
    block_bytes, block_elements = KV_CACHE_TYPES[kv_type]
    return elements // block_elements * block_bytes


def _architecture(info: ModelInfoLike) -> str:
    arch = getattr(info, "architecture", None) or info.get("general.architecture")
    if not arch:
        raise InvalidOptions("the model has no general.architecture; cannot estimate its memory")
    return str(arch)


def _int(value: Any, default: int = 0) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _per_layer(value: Any, count: int, default: int) -> tuple[int, ...]:
    """A hyper-parameter that may be one number or one per layer."""
    if value is None:
        return (default,) * count
    if isinstance(value, (str, bytes)):
        return (_int(value, default),) * count
    try:
        items = [int(x) for x in value]
    except TypeError:
        return (_int(value, default),) * count
    if not items:
        return (default,) * count
    if len(items) < count:
        items += [items[-1]] * (count - len(items))
    return tuple(items[:count])


@attrs.frozen
class _Hyper:
    block_count: int
    embedding_length: int
    feed_forward_length: int
    head_count: tuple[int, ...]
    head_count_kv: tuple[int, ...]
    key_length: int
    value_length: int
    key_length_swa: int
    value_length_swa: int
    sliding_window: int
    vocab_size: int

    @classmethod
    def read(cls, info: ModelInfoLike, arch: str) -> _Hyper:
        def key(name: str, default: Any = None) -> Any:
            return info.get(f"{arch}.{name}", default)

        blocks = _int(key("block_count"))
        if blocks <= 0:
            blocks = 1 + max((int(m.group(1)) for t in info.tensors if (m := _BLOCK.match(t.name))), default=-1)
        embd = _int(key("embedding_length"))
        heads = _per_layer(key("attention.head_count"), blocks, 0)
        heads_kv = _per_layer(key("attention.head_count_kv"), blocks, 0)
        if key("attention.head_count_kv") is None:
            heads_kv = heads
        head_max = max(heads, default=0)
        head_dim = embd // head_max if head_max else 0
        key_len = _int(key("attention.key_length"), head_dim)
        value_len = _int(key("attention.value_length"), head_dim)
        ffn = _per_layer(key("feed_forward_length"), blocks, 0)
        return cls(
            block_count=blocks,
            embedding_length=embd,
            feed_forward_length=max(ffn, default=0),
            head_count=heads,
            head_count_kv=heads_kv,
            key_length=key_len,
            value_length=value_len,
            key_length_swa=_int(key("attention.key_length_swa"), key_len),
            value_length_swa=_int(key("attention.value_length_swa"), value_len),
            sliding_window=_int(key("attention.sliding_window")),
            vocab_size=_vocab_size(info, arch),
        )


def _vocab_size(info: ModelInfoLike, arch: str) -> int:
    for tensor in info.tensors:
        if tensor.name == "token_embd.weight" and len(tensor.shape) >= 2:
            return int(tensor.shape[1])
    size = _int(info.get(f"{arch}.vocab_size"))
    if size:
        return size
    tokens = info.get("tokenizer.ggml.tokens")
    try:
        return len(tokens) if tokens is not None else 0
    except TypeError:
        return 0


def _swa_layers(info: ModelInfoLike, arch: str, blocks: int) -> frozenset[int]:
    """Indexes of the layers that attend through the sliding window."""
    pattern = info.get(f"{arch}.attention.sliding_window_pattern")
    if pattern is not None and not isinstance(pattern, (int, float, str, bytes)):
        try:
            flags = [bool(x) for x in pattern]
        except TypeError:
            flags = []
        if flags:
            return frozenset(i for i, flag in enumerate(flags[:blocks]) if flag)
    if pattern is not None and _int(pattern) > 0:
        n, dense_first = _int(pattern), _SWA_PATTERNS.get(arch, (0, False))[1]
    elif arch in _SWA_PATTERNS:
        n, dense_first = _SWA_PATTERNS[arch]
    else:
        return frozenset()  # unknown layout: assume full attention everywhere (over- rather than under-estimate)
    if dense_first:
        return frozenset(i for i in range(blocks) if i % n != 0)
    return frozenset(i for i in range(blocks) if i % n < n - 1)


def _group_tensors(info: ModelInfoLike, blocks: int) -> tuple[list[int], int, int, int, int]:
    """(bytes per layer, host-only bytes, output bytes on GPU, output bytes on CPU, output matrix bytes)."""
    per_layer = [0] * blocks
    input_bytes = 0
    output_norm = 0
    output_matrix = 0
    token_embd = 0
    for tensor in info.tensors:
        size = int(tensor.n_bytes)
        name = tensor.name
        match = _BLOCK.match(name)
        if match and int(match.group(1)) < blocks:
            per_layer[int(match.group(1))] += size
        elif name.startswith("output_norm."):
            output_norm += size
        elif name.startswith("output."):
            output_matrix += size
        else:
            if name == "token_embd.weight":
                token_embd = size
            input_bytes += size
    if output_matrix:
        return per_layer, input_bytes, output_norm + output_matrix, output_norm + output_matrix, output_matrix
    # Tied embeddings: on a GPU the output layer needs its own copy of the token embedding.
    return per_layer, input_bytes, output_norm + token_embd, output_norm, token_embd


def _recurrent_state_bytes(info: ModelInfoLike, arch: str) -> int:
    """Per-sequence state of a recurrent (Mamba-style) layer, kept in f32."""
    d_conv = _int(info.get(f"{arch}.ssm.conv_kernel"))
    d_state = _int(info.get(f"{arch}.ssm.state_size"))
    d_inner = _int(info.get(f"{arch}.ssm.inner_size"))
    n_group = _int(info.get(f"{arch}.ssm.group_count"))
    conv = (d_conv - 1) * (d_inner + 2 * n_group * d_state) if d_conv > 0 else 0
    return 4 * (conv + d_state * d_inner)


def _graph_sizes(
    hp: _Hyper, *, n_ubatch: int, n_kv: int, flash_attention: bool, output_weight: int, logits: bool = True
) -> tuple[int, int, int, int]:
    """(host graph, host graph with everything offloaded, GPU graph full offload, GPU graph partial offload).

    llama.cpp reserves the graph of one worst-case micro-batch: `n_ubatch` tokens, every one producing
    logits, attending over a whole sequence's cells. Its allocator reuses memory between nodes, so the
    buffer is about the largest stage, not the sum of them.
    """
    ub, embd = n_ubatch, hp.embedding_length
    vocab = hp.vocab_size if logits else 0
    heads = max(hp.head_count, default=0)
    logits_stage = 4 * ub * (vocab + 2 * embd)
    ffn_stage = 4 * ub * (hp.feed_forward_length + 3 * embd)
    if flash_attention:
        # The f16 mask stays alive through the layer; no n_kv x n_ubatch score matrix is materialised.
        layer_stage = 2 * ub * n_kv + ffn_stage
    else:
        # f32 scores for every head, the f32 mask, and a few embedding-sized activations.
        layer_stage = max(4 * ub * n_kv * (heads + 1) + 4 * ub * 6 * embd, ffn_stage)
    graph = max(logits_stage, layer_stage)
    # Split models run the CPU-resident output matmul on the GPU for big batches, copying its weights there.
    partial = max(graph, output_weight + 4 * ub * (vocab + embd)) if logits else graph
    offloaded = 4 * ub * embd
    return graph, offloaded, graph, partial


# -- planning ----------------------------------------------------------------------------------------------------


def format_bytes(n: int | float) -> str:
    """Bytes for people: 512 B, 3.0 KiB, 12.5 MiB, 7.8 GiB."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= scale:
            return f"{sign}{value / scale:.1f} {unit}"
    return f"{sign}{int(value)} B"


def gpu_overhead_from_env() -> int:
    """Bytes to keep free on every GPU, from LOCALLLM_GPU_OVERHEAD, else OLLAMA_GPU_OVERHEAD (0 when unset)."""
    from ..settings import read_setting

    try:
        return cast(int, read_setting("gpu_overhead"))
    except InvalidRequest as exc:
        raise InvalidOptions(str(exc)) from None


@attrs.frozen
class _Placement:
    counts: dict[int, int]
    used: dict[int, int]  # bytes of layers (and output) per GPU, graph excluded
    repeating: int
    output_gpu: int | None
    projector_gpu: int | None = None  # the GPU whose room the projector took

    @property
    def layers(self) -> int:
        return self.repeating + (1 if self.output_gpu is not None else 0)


def _place(
    estimate: MemoryEstimate, gpus: Sequence[GpuDevice], rooms: dict[int, int], target: int, preferred: int
) -> _Placement:
    """Put layers last-first on the GPU with the most room left; the output layer only after all of them."""
    room = dict(rooms)
    counts = dict.fromkeys(rooms, 0)
    used = dict.fromkeys(rooms, 0)
    rank = {gpu.index: position for position, gpu in enumerate(gpus)}
    blocks = estimate.block_count
    repeating = 0
    for il in range(blocks - 1, -1, -1):
        if repeating >= target:
            break
        size = estimate.layer_bytes(il)
        fitting = [index for index in room if room[index] >= size]
        if not fitting:
            break  # llama.cpp offloads a contiguous run of the last layers: a gap ends it
        best = max(fitting, key=lambda index: (room[index], -rank[index]))
        room[best] -= size
        used[best] += size
        counts[best] += 1
        repeating += 1
    output_gpu = None
    if repeating == blocks and target > blocks:
        holders = [index for index in room if counts[index] > 0 and room[index] >= estimate.output_bytes]
        if holders:
            output_gpu = preferred if preferred in holders else max(holders, key=lambda i: (room[i], -rank[i]))
            used[output_gpu] += estimate.output_bytes
            counts[output_gpu] += 1
    return _Placement(counts=counts, used=used, repeating=repeating, output_gpu=output_gpu)


def plan_layers(
    estimate: MemoryEstimate,
    inventory: InventorySource,
    *,
    num_gpu: int = -1,
    main_gpu: int = 0,
    overhead: int | None = None,
    reserve: int = GPU_RESERVE,
    spread: bool = False,
) -> LayerPlan:
    """Decide how many layers go to which GPU, and check the rest fits in system memory.

    `num_gpu` caps the layers offloaded (-1: as many as fit, 0: CPU only). `main_gpu` is tried first and wins
    ties; it holds the output layer when it has layers. A model that fits on one GPU goes on one GPU (the
    main GPU if it fits there); otherwise as few GPUs as hold it, otherwise every GPU with room, and the rest
    stays on the CPU. With `spread` (OLLAMA_SCHED_SPREAD) a model goes across every GPU with room, even when
    one would hold it. Each GPU keeps `overhead` (default: LOCALLLM_GPU_OVERHEAD, else OLLAMA_GPU_OVERHEAD) plus
    `reserve` bytes free and room for its compute buffer.

    Raises InsufficientMemory when the part left for the CPU does not fit in free system memory (and swap).
    """
    inv = resolve_inventory(inventory)
    if not isinstance(num_gpu, int) or isinstance(num_gpu, bool) or num_gpu < -1:
        raise InvalidOptions(f"num_gpu must be -1 (as many as fit), 0 (CPU only) or a layer count, got {num_gpu!r}")
    if overhead is None:
        overhead = gpu_overhead_from_env()
    if overhead < 0 or reserve < 0:
        raise InvalidOptions("GPU overhead and reserve must be non-negative byte counts")
    if inv.gpus and num_gpu != 0 and inv.gpu(main_gpu) is None:
        indexes = ", ".join(str(gpu.index) for gpu in inv.gpus)
        raise InvalidOptions(f"main_gpu {main_gpu} does not exist; the GPUs are {indexes}")

    blocks = estimate.block_count
    everything = blocks + 1
    target = everything if num_gpu < 0 else min(num_gpu, everything)

    placement: _Placement | None = None
    graph = 0
    if inv.gpus and target > 0:
        placement, graph = _choose_gpus(estimate, inv, target, main_gpu, overhead, reserve, spread)

    if placement is None or placement.layers == 0:
        placement, graph = _Placement(counts={}, used={}, repeating=0, output_gpu=None), 0
    return _finish(estimate, inv, placement, graph, main_gpu)


def _choose_gpus(
    estimate: MemoryEstimate,
    inv: DeviceInventory,
    target: int,
    main_gpu: int,
    overhead: int,
    reserve: int,
    spread: bool = False,
) -> tuple[_Placement, int]:
    main = inv.gpu(main_gpu)
    others = sorted((g for g in inv.gpus if g.index != main_gpu), key=lambda g: (-g.free_memory, g.index))
    order = ([main] if main is not None else []) + others

    def attempt(gpus: Sequence[GpuDevice], graph: int) -> _Placement:
        rooms = {g.index: g.free_memory - overhead - reserve - graph for g in gpus}
        # The projector goes on the first GPU tried (the main GPU when it is among them), before any layer.
        first = gpus[0].index if gpus else None
        if estimate.projector_bytes and first is not None:
            rooms[first] -= estimate.projector_bytes
        rooms = {index: room for index, room in rooms.items() if room > 0}
        placed = _place(estimate, gpus, rooms, target, main_gpu)
        if estimate.projector_bytes and first is not None and placed.counts.get(first, 0) > 0:
            return attrs.evolve(placed, projector_gpu=first)
        return placed

    if spread and len(order) > 1:
        return attempt(order, estimate.graph_gpu_partial), estimate.graph_gpu_partial
    # One GPU if any holds everything asked for: the main GPU first, then by free memory.
    for gpu in order:
        graph = estimate.graph_gpu_full if target > estimate.block_count else estimate.graph_gpu_partial
        placed = attempt([gpu], graph)
        if placed.layers >= target:
            return placed, graph
    # Several GPUs always budget for the larger, split-model compute buffer on each.
    graph = estimate.graph_gpu_partial
    best = attempt(order[:1], graph)
    for count in range(2, len(order) + 1):
        placed = attempt(order[:count], graph)
        if placed.layers >= target:
            return placed, graph
        if placed.layers > best.layers:
            best = placed
    return best, graph


def _finish(
    estimate: MemoryEstimate, inv: DeviceInventory, placement: _Placement, graph: int, main_gpu: int
) -> LayerPlan:
    blocks = estimate.block_count
    on_gpu = placement.layers
    output_on_gpu = placement.output_gpu is not None
    fits_fully = output_on_gpu and placement.repeating == blocks

    gpu_bytes: dict[int, int] = {}
    for index, count in placement.counts.items():
        if count > 0:
            gpu_bytes[index] = placement.used[index] + graph
    if placement.projector_gpu is not None:
        gpu_bytes[placement.projector_gpu] += estimate.projector_bytes
    cpu_layers = range(blocks - placement.repeating)
    cpu = estimate.input_bytes + estimate.output_buffer
    cpu += sum(estimate.layer_bytes(il) for il in cpu_layers)
    cpu += 0 if output_on_gpu else estimate.output_cpu_bytes
    cpu += estimate.graph_cpu_offloaded if fits_fully else estimate.graph_cpu
    cpu += estimate.projector_bytes if placement.projector_gpu is None else 0

    layers_per_device = {index: count for index, count in placement.counts.items() if count > 0}
    tensor_split: tuple[float, ...] | None = None
    if len(inv.gpus) > 1 and on_gpu > 0:
        width = max(g.index for g in inv.gpus) + 1
        tensor_split = tuple(layers_per_device.get(i, 0) / on_gpu for i in range(width))
    if len(layers_per_device) == 1:
        main_gpu = next(iter(layers_per_device))

    vram = sum(gpu_bytes.values())
    bytes_per_device: dict[int | str, int] = dict(gpu_bytes.items())
    bytes_per_device["cpu"] = cpu
    available_cpu = inv.system.free + inv.system.free_swap
    if cpu > available_cpu:
        raise InsufficientMemory(_shortfall_message(estimate, inv, vram, cpu))
    return LayerPlan(
        gpu_layers=on_gpu,
        layers_per_device=layers_per_device,
        bytes_per_device=bytes_per_device,
        tensor_split=tensor_split,
        main_gpu=main_gpu,
        fits_fully=fits_fully,
        output_on_gpu=output_on_gpu,
        total_bytes=vram + cpu,
        vram_bytes=vram,
    )


def _amount(n: int) -> str:
    return f"{format_bytes(n)} ({n:,} bytes)"


def _shortfall_message(estimate: MemoryEstimate, inv: DeviceInventory, vram: int, cpu: int) -> str:
    needed = vram + cpu
    system = inv.system.free + inv.system.free_swap
    gpu_parts = [f"GPU {g.index} ({g.name}) {format_bytes(g.free_memory)} free" for g in inv.gpus]
    gpu_free = sum(g.free_memory for g in inv.gpus)
    where = ", ".join([*gpu_parts, f"system memory {format_bytes(inv.system.free)} free"])
    if inv.system.free_swap:
        where += f" + {format_bytes(inv.system.free_swap)} swap"
    split = f"{_amount(vram)} on GPUs and {_amount(cpu)} in system memory" if vram else "all in system memory"
    return (
        f"the model needs {_amount(needed)} ({split}) with num_ctx={estimate.num_ctx} and "
        f"num_parallel={estimate.num_parallel}, but only {_amount(gpu_free + system)} is available: {where}. "
        "Use a smaller model or quantization, a lower num_ctx or num_parallel, or free some memory."
    )
