"""Thin, owned wrappers over llama.cpp's C API (through llama_cpp's ctypes bindings).

Every handle here has an explicit owner and a `close()` that frees it exactly
once; nothing relies on garbage collection to release model memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import llama_cpp
import numpy as np
import numpy.typing as npt

from ..errors import CapabilityError, InvalidFormat, InvalidRequest, ModelLoadError, RunnerError
from ..options import Options
from .backend import Pooling
from .protocol import KV_CACHE_TYPES, LoadConfig

if TYPE_CHECKING:
    from . import backend

__all__ = [
    "Batch",
    "LlamaBackend",
    "LlamaContext",
    "LlamaEmbeddingContext",
    "LlamaModel",
    "LoraAdapters",
    "SamplerChain",
    "ensure_backend",
    "log_callback",
    "reference_llama",
    "repack_default",
    "repack_is_safe",
    "supports_gpu_offload",
]

logger = logging.getLogger("localllm.llama_cpp")

_T = TypeVar("_T")

_backend_lock = threading.Lock()
_backend_ready = False

# ggml log levels -> Python logging levels. CONT (5) continues the previous line.
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = logging.DEBUG


@llama_cpp.llama_log_callback
def log_callback(level: int, text: bytes | None, _user_data: Any) -> None:
    global _last_level
    if not text:
        return
    message = text.decode("utf-8", errors="replace").rstrip("\n")
    python_level = _last_level if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level = python_level
    # llama.cpp is chatty at INFO while loading; keep that at DEBUG for Python users.
    if python_level == logging.INFO:
        python_level = logging.DEBUG
    if message and logger.isEnabledFor(python_level):
        logger.log(python_level, "%s", message)


def ensure_backend() -> None:
    """Initialise llama.cpp once per process and route its logs into `logging`."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        llama_cpp.llama_log_set(log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux reports them; None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def repack_is_safe(system_info: str, cpu_flags: frozenset[str] | None) -> bool:
    """Whether llama.cpp's extra CPU buffer types can be used without risk to the process.

    They hold weights in layouts for faster matmuls: the repacked ones (AVX2/AVX-512/NEON), and AMX
    tiles when ggml was built with AMX kernels (a native build on an AMX CPU). The vendored ggml's
    AMX matmul runs tile instructions on threads whose tile state it never configured, which traps
    (SIGILL) and kills the host process. llama.cpp prefers AMX over repacking and can only turn both
    off together, so both go where AMX could be picked: a build with AMX kernels on a CPU with AMX
    (or one whose flags cannot be read).
    """
    build_has_amx = "AMX_INT8 = 1" in system_info
    cpu_has_amx = cpu_flags is None or "amx_tile" in cpu_flags
    return not (build_has_amx and cpu_has_amx)


_repack_default: bool | None = None


def repack_default() -> bool:
    """`repack_is_safe` for this process's llama.cpp build and CPU (computed once)."""
    global _repack_default
    if _repack_default is None:
        ensure_backend()
        info = (llama_cpp.llama_print_system_info() or b"").decode("utf-8", errors="replace")
        _repack_default = repack_is_safe(info, _cpu_flags())
        if not _repack_default:
            logger.info("weight repacking is off: this llama.cpp build would use AMX kernels on this CPU")
    return _repack_default


def reference_llama(path: str, **kwargs: Any) -> Any:
    """llama-cpp-python's high-level `Llama`, with weights in the layouts `repack_default` picks.

    `Llama` always asks for llama.cpp's extra weight layouts, AMX included; the tests and benchmarks
    compare against it through this, so a reference run cannot kill the process either.
    """
    from llama_cpp import llama_cpp as low_level

    default_params = low_level.llama_model_default_params

    def params() -> Any:
        value = default_params()
        value.use_extra_bufts = repack_default()
        return value

    low_level.llama_model_default_params = params
    try:
        return llama_cpp.Llama(path, **kwargs)
    finally:
        low_level.llama_model_default_params = default_params


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build has a GPU backend."""
    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except (AttributeError, OSError):
        return False


def default_threads() -> int:
    """Physical cores are what matter for decoding; without that count use all CPUs."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LlamaModel:
    """A loaded model (weights and vocabulary)."""

    def __init__(
        self,
        path: str,
        *,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        repack: bool | None = None,
    ) -> None:
        ensure_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack_default() if repack is None else repack
        params.main_gpu = main_gpu
        params.load_mode = {
            (True, False): llama_cpp.LLAMA_LOAD_MODE_MMAP,
            (True, True): llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK,
            (False, True): llama_cpp.LLAMA_LOAD_MODE_MLOCK,
            (False, False): llama_cpp.LLAMA_LOAD_MODE_NONE,
        }[(use_mmap, use_mlock)]
        self._tensor_split = None
        if tensor_split:
            # llama.cpp reads llama_max_devices() floats, whatever we pass.
            size = max(len(tensor_split), int(llama_cpp.llama_max_devices()))
            array = (ctypes.c_float * size)(*tensor_split)
            self._tensor_split = array  # keep alive while loading
            params.tensor_split = array
        handle = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not handle:
            raise ModelLoadError(f"llama.cpp could not load {path}; see the localllm.llama_cpp log for why")
        self.handle = handle
        self.path = path
        self.vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(handle)
        self.n_layer: int = llama_cpp.llama_model_n_layer(handle)
        self.size: int = llama_cpp.llama_model_size(handle)
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.has_encoder: bool = bool(llama_cpp.llama_model_has_encoder(handle))
        self._piece_buffer = ctypes.create_string_buffer(64)
        self._closed = False

    @classmethod
    def for_config(
        cls, config: LoadConfig, *, gpu_layers: int = 0, tensor_split: Sequence[float] | None = None
    ) -> LlamaModel:
        """Load the model a runner's configuration names, with the layer plan the scheduler chose."""
        return cls(
            config.model_path,
            n_gpu_layers=gpu_layers,
            main_gpu=config.main_gpu,
            tensor_split=tensor_split,
            use_mmap=config.use_mmap,
            use_mlock=config.use_mlock,
            repack=config.repack,
        )

    # -- vocabulary -------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
            if n >= 0:
                return list(tokens[:n])
            capacity = -n  # llama.cpp says how many it needs

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (pieces may hold part of a UTF-8 character)."""
        buffer = self._piece_buffer
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        raw = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        """Token ids outside the vocabulary would make llama.cpp abort: refuse them here."""
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary of {self.n_vocab}")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos_token(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos_token(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buffer, len(buffer))
        if n < 0:
            return None
        if n >= len(buffer):
            buffer = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", errors="replace")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            llama_cpp.llama_model_free(self.handle)
            self.handle = None


class LlamaContext:
    """A context over a model: the KV cache with `n_seq_max` independent sequences."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        n_batch: int,
        n_seq_max: int,
        n_threads: int,
        embeddings: bool = False,
        type_k: int | None = None,
        type_v: int | None = None,
        flash_attn: bool | None = None,
        adapters: LoraAdapters | None = None,
    ) -> None:
        """`adapters`, if given, are applied to the context, which owns them once it exists (`close` frees them)."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.embeddings = embeddings
        params.no_perf = True
        # Each sequence gets its own n_ctx / n_seq_max cells, like llama-server's slots.
        params.kv_unified = False
        # Sliding-window layers keep only their window (llama.cpp's default keeps the full context).
        params.swa_full = False
        if type_k is not None:
            params.type_k = type_k
        if type_v is not None:
            params.type_v = type_v
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
            if flash_attn is None
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        handle = llama_cpp.llama_init_from_model(model.handle, params)
        if not handle:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {n_ctx} tokens for {model.path}; "
                "try a smaller num_ctx or fewer parallel slots"
            )
        self.handle = handle
        self.model = model
        self.n_ctx: int = llama_cpp.llama_n_ctx(handle)
        self.n_ctx_seq: int = llama_cpp.llama_n_ctx_seq(handle)
        self.n_batch: int = llama_cpp.llama_n_batch(handle)
        self.memory = llama_cpp.llama_get_memory(handle)
        self.adapters = adapters
        self._closed = False
        if adapters is not None:
            adapters.apply(self)

    def decode(self, batch: backend.Batch) -> int:
        return int(llama_cpp.llama_decode(self.handle, _native(batch, Batch).struct))

    def encode(self, batch: Batch) -> int:
        return int(llama_cpp.llama_encode(self.handle, batch.struct))

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        """The last decode's logits at batch position `index`: a view, valid until the next decode."""
        pointer = llama_cpp.llama_get_logits_ith(self.handle, index)
        if not pointer:
            raise RunnerError(f"llama.cpp has no logits for batch position {index}")
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab,))

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def shift(self, seq_id: int, keep: int, discard: int) -> bool:
        if keep < 0 or discard < 1 or not llama_cpp.llama_memory_can_shift(self.memory):
            return False
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq_id, keep, keep + discard):
            return False
        # The positions after the gap move back over it; llama.cpp re-rotates their keys at the next decode.
        llama_cpp.llama_memory_seq_add(self.memory, seq_id, keep + discard, -1, -discard)
        return True

    def seq_pos_min(self, seq_id: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self.memory, seq_id))

    @property
    def shares_sequences(self) -> bool:
        """Whether whole sequences can be copied and saved: attention caches can, recurrent states not."""
        model = self.model.handle
        return not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))

    def seq_cp(self, src: int, dst: int) -> bool:
        if not self.shares_sequences:
            return False
        self.seq_rm(dst, 0)
        # Each sequence has a cache stream of its own: only a whole-stream copy (p0 = p1 = -1) is supported
        # across streams; llama.cpp asserts (aborts) on any narrower range.
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        return True

    def state_get(self, seq_id: int) -> bytes:
        if not self.shares_sequences:
            return b""
        size = llama_cpp.llama_state_seq_get_size(self.handle, seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.handle, buffer, size, seq_id)
        return bytes(memoryview(buffer)[:written])

    def state_set(self, seq_id: int, state: bytes) -> bool:
        if not self.shares_sequences or not state:
            return False
        self.seq_rm(seq_id, 0)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self.handle, buffer, len(state), seq_id) == 0:
            self.seq_rm(seq_id, 0)  # a failed restore may leave part of the state behind
            return False
        return True

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            llama_cpp.llama_free(self.handle)
            self.handle = None
            if self.adapters is not None:
                self.adapters.close()


class LlamaEmbeddingContext:
    """A context made for embeddings (the `EmbeddingContext` protocol): whole sequences, pooled as the model says."""

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_batch: int, n_seq_max: int, config: LoadConfig) -> None:
        quantized_kv = config.kv_cache_type != "f16"
        self.context = LlamaContext(
            model,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_seq_max=n_seq_max,
            n_threads=config.num_thread or default_threads(),
            embeddings=True,
            type_k=KV_CACHE_TYPES[config.kv_cache_type],
            type_v=KV_CACHE_TYPES[config.kv_cache_type],
            flash_attn=True if quantized_kv else None,  # a quantized V cache requires it
        )
        try:
            value = int(llama_cpp.llama_pooling_type(self.context.handle))
            try:
                self.pooling = Pooling(value)
            except ValueError:
                raise CapabilityError(
                    f"llama.cpp pools {model.path} in a way this version does not know (type {value}); "
                    "upgrade localllm to embed with it"
                ) from None
            # Models whose output differs from their hidden size (n_embd_out) say so; older bindings lack it.
            n_embd_out = getattr(llama_cpp, "llama_model_n_embd_out", None)
            self.n_embd: int = int(
                n_embd_out(model.handle) if n_embd_out is not None else llama_cpp.llama_model_n_embd(model.handle)
            )
        except BaseException:
            self.context.close()
            raise
        self.n_batch: int = self.context.n_batch
        # An encoder (BERT) has no KV cache and encodes; a decoder keeps one, cleared before each batch.
        self._has_memory = bool(self.context.memory)

    def decode(self, batch: backend.Batch) -> int:
        native = _native(batch, Batch)
        if not self._has_memory:
            return self.context.encode(native)
        self.context.clear()  # every sequence of the last batch is finished
        return self.context.decode(native)

    def pooled(self, seq_id: int) -> npt.NDArray[np.float32]:
        pointer = llama_cpp.llama_get_embeddings_seq(self.context.handle, seq_id)
        if not pointer:
            raise RunnerError(f"llama.cpp returned no pooled embedding for sequence {seq_id}")
        return _floats(pointer, self.n_embd)

    def token_embedding(self, index: int) -> npt.NDArray[np.float32]:
        pointer = llama_cpp.llama_get_embeddings_ith(self.context.handle, index)
        if not pointer:
            raise RunnerError(f"llama.cpp returned no embedding for token {index}")
        return _floats(pointer, self.n_embd)

    def close(self) -> None:
        self.context.close()


def _floats(pointer: Any, n: int) -> npt.NDArray[np.float32]:
    """A copy of `n` floats that llama.cpp owns."""
    floats = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(floats, shape=(n,)).astype(np.float32)


class LoraAdapters:
    """LoRA adapters loaded for one model, applied to its contexts at full scale."""

    def __init__(self, model: LlamaModel, paths: Sequence[str]) -> None:
        self._handles: list[Any] = []
        for path in paths:
            handle = llama_cpp.llama_adapter_lora_init(model.handle, path.encode())
            if not handle:
                self.close()
                raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {path}")
            self._handles.append(handle)

    def apply(self, context: LlamaContext) -> None:
        if not self._handles:
            return
        count = len(self._handles)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * count)(*self._handles)
        scales = (ctypes.c_float * count)(*([1.0] * count))
        llama_cpp.llama_set_adapters_lora(context.handle, handles, count, scales)

    def close(self) -> None:
        for handle in self._handles:
            llama_cpp.llama_adapter_lora_free(handle)
        self._handles = []


class Batch:
    """A reusable llama_batch of up to `capacity` tokens."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        self.capacity = capacity
        self.struct = llama_cpp.llama_batch_init(capacity, 0, n_seq_max)
        # The arrays, looked up once: each struct field access builds a new ctypes object.
        self._token = self.struct.token
        self._pos = self.struct.pos
        self._n_seq_id = self.struct.n_seq_id
        self._seq_id = self.struct.seq_id
        self._logits = self.struct.logits
        self.n_tokens = 0
        self._closed = False

    def clear(self) -> None:
        self.n_tokens = 0
        self.struct.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append a token; returns its index in the batch (where its logits will be)."""
        i = self.n_tokens
        if i >= self.capacity:
            raise IndexError("batch is full")
        self._token[i] = token
        self._pos[i] = pos
        self._n_seq_id[i] = 1
        self._seq_id[i][0] = seq_id
        self._logits[i] = logits
        self.n_tokens = i + 1
        self.struct.n_tokens = i + 1
        return i

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            llama_cpp.llama_batch_free(self.struct)


class SamplerChain:
    """One sequence's sampler chain, built from Ollama's options.

    A grammar is kept apart from the chain and applied lazily, as llama-server does: the chain
    picks a token from the unconstrained logits, the grammar checks that one token, and only when
    it is rejected are the candidates rebuilt, constrained by the grammar over the whole
    vocabulary, and sampled again. The result follows the same distribution as applying the
    grammar first, at a fraction of the cost: most tokens the model picks are allowed anyway.
    """

    # Candidate rows (id, logit = 0, p = 0) for a vocabulary size, shared read-only by all chains.
    _templates: dict[int, npt.NDArray[np.float32]] = {}

    def __init__(self, model: LlamaModel, options: Options, *, grammar: str | None = None, n_ctx: int = 0) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(params)
        self.handle = chain
        self.grammar: Any = None
        self._closed = False
        self._argmax = False  # the chain is greedy alone
        self._n_vocab: int = model.n_vocab
        try:
            if grammar:
                if self._n_vocab <= 0:
                    raise RunnerError("the model has an empty vocabulary")
                grammar_sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
                if not grammar_sampler:
                    raise InvalidFormat("the output grammar could not be parsed by llama.cpp")
                self.grammar = grammar_sampler
                self._init_candidates()
            # The window never needs to exceed the context; llama.cpp would allocate all of it.
            last_n = (
                n_ctx if options.repeat_last_n == -1 else min(options.repeat_last_n, n_ctx or options.repeat_last_n)
            )
            penalized = (options.repeat_penalty, options.presence_penalty, options.frequency_penalty) != (1.0, 0.0, 0.0)
            if last_n != 0 and penalized:
                llama_cpp.llama_sampler_chain_add(
                    chain,
                    llama_cpp.llama_sampler_init_penalties(
                        model.n_vocab,
                        last_n,
                        options.repeat_penalty,
                        options.frequency_penalty,
                        options.presence_penalty,
                    ),
                )
            if options.temperature <= 0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
                # Greedy alone is the most likely token: read it off the logits, without building the
                # candidate list of the whole vocabulary that the chain builds (a tenth of a millisecond).
                self._argmax = not grammar and not (last_n != 0 and penalized)
            else:
                if options.top_k > 0:
                    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(options.top_k))
                if options.typical_p < 1.0:
                    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_typical(options.typical_p, 1))
                if options.top_p < 1.0:
                    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(options.top_p, 1))
                if options.min_p > 0.0:
                    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(options.min_p, 1))
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(options.temperature))
                dist_seed = llama_cpp.LLAMA_DEFAULT_SEED if options.seed < 0 else options.seed & 0xFFFFFFFF
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(dist_seed))
        except BaseException:
            self.close()
            raise

    def _init_candidates(self) -> None:
        """The buffers the grammar path samples from: all the vocabulary, and a single token."""
        n_vocab = self._n_vocab
        template = self._templates.get(n_vocab)
        if template is None:
            rows = np.zeros(n_vocab, dtype=self._token_dtype())
            rows["id"] = np.arange(n_vocab, dtype=np.int32)
            template = rows.view(np.float32).reshape(n_vocab, 3)
            template.flags.writeable = False
            self._templates[n_vocab] = template
        self._template = template
        # Rows laid out as llama_token_data (id, logit, p), seen as a float32 matrix for fast refills.
        self._rows = np.zeros(n_vocab, dtype=self._token_dtype())
        self._matrix = self._rows.view(np.float32).reshape(n_vocab, 3)
        self._rows_pointer = ctypes.cast(self._rows.ctypes.data, llama_cpp.llama_token_data_p)
        self._candidates: Any = llama_cpp.llama_token_data_array()
        self._candidates_ref = ctypes.byref(self._candidates)
        self._single: Any = llama_cpp.llama_token_data()
        self._single_pointer = ctypes.pointer(self._single)
        self._single_array: Any = llama_cpp.llama_token_data_array()
        self._single_ref = ctypes.byref(self._single_array)

    @staticmethod
    def _token_dtype() -> np.dtype[Any]:
        # Three 4-byte fields, packed: the rows can then be refilled as a float32 matrix.
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        if dtype != np.dtype(llama_cpp.llama_token_data):
            raise RunnerError("llama_token_data has an unexpected layout")
        return dtype

    def _check_token(self, token: int) -> int:
        if not 0 <= token < self._n_vocab:
            raise RunnerError(f"token {token} is outside the vocabulary of {self._n_vocab}")
        return token

    def _grammar_allows(self, token: int) -> bool:
        """Whether the grammar allows `token` next (end-of-generation only where the grammar is complete)."""
        single = self._single
        single.id = self._check_token(token)
        single.logit = 1.0
        single.p = 0.0
        array = self._single_array
        array.data = self._single_pointer
        array.size = 1
        array.selected = -1
        array.sorted = False
        llama_cpp.llama_sampler_apply(self.grammar, self._single_ref)
        return bool(array.size == 1 and array.data[0].logit != -np.inf)

    def _sample_candidates(self, logits: npt.NDArray[np.float32], *, grammar_first: bool) -> int:
        """Apply the chain (after the grammar, if `grammar_first`) to all the vocabulary; the chosen token.

        The chain does not accept the token: the caller does, once it is final.
        """
        matrix = self._matrix
        np.copyto(matrix, self._template)
        matrix[:, 1] = logits
        candidates = self._candidates
        candidates.data = self._rows_pointer
        candidates.size = self._n_vocab
        candidates.selected = -1
        candidates.sorted = False
        if grammar_first:
            llama_cpp.llama_sampler_apply(self.grammar, self._candidates_ref)
            if candidates.size == 0 or not np.isfinite(matrix[: min(candidates.size, self._n_vocab), 1]).any():
                raise RunnerError("the output grammar allows no next token")
        llama_cpp.llama_sampler_apply(self.handle, self._candidates_ref)
        selected = candidates.selected
        if not 0 <= selected < candidates.size:
            raise RunnerError("llama.cpp's samplers selected no token")
        return int(candidates.data[selected].id)

    def accept(self, token: int) -> None:
        if self.grammar is not None:
            if not self._grammar_allows(token):
                raise RunnerError(f"token {token} does not follow the output grammar")
            llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.handle, token)

    def sample(self, context: backend.Context, index: int) -> int:
        """Sample from the logits at batch position `index` (this also accepts the token)."""
        native = _native(context, LlamaContext)
        if self._argmax:
            return int(np.argmax(native.logits(index)))  # the first of equal logits, as llama.cpp's greedy
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.handle, native.handle, index))
        logits = native.logits(index)
        if logits.shape != (self._n_vocab,):
            raise RunnerError(f"the logits cover {logits.size} tokens, not the vocabulary of {self._n_vocab}")
        token = self._sample_candidates(logits, grammar_first=False)
        if not self._grammar_allows(token):
            token = self._sample_candidates(logits, grammar_first=True)
            if not self._grammar_allows(token):
                raise RunnerError(f"token {token} does not follow the output grammar")
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.handle, token)
        return token

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            llama_cpp.llama_sampler_free(self.handle)
            self.handle = None
            if self.grammar is not None:
                llama_cpp.llama_sampler_free(self.grammar)
                self.grammar = None


class LlamaBackend:
    """llama.cpp behind the runner's `Backend` protocol, made of the classes above."""

    @property
    def state_format(self) -> str:
        return f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"

    @property
    def max_parallel_sequences(self) -> int:
        return int(llama_cpp.llama_max_parallel_sequences())

    def load_model(
        self, config: LoadConfig, *, gpu_layers: int = 0, tensor_split: Sequence[float] | None = None
    ) -> LlamaModel:
        return LlamaModel.for_config(config, gpu_layers=gpu_layers, tensor_split=tensor_split)

    def new_context(self, model: backend.Model, config: LoadConfig) -> LlamaContext:
        llama_model = _native(model, LlamaModel)
        adapters = LoraAdapters(llama_model, config.adapters)  # frees what it loaded if one fails
        quantized_kv = config.kv_cache_type != "f16"
        try:
            return LlamaContext(
                llama_model,
                n_ctx=config.num_ctx * config.num_parallel,
                # Every slot may need logits in one batch: llama.cpp asserts (aborts) on a batch smaller.
                n_batch=max(config.num_batch, config.num_parallel),
                n_seq_max=config.num_parallel,
                n_threads=config.num_thread or default_threads(),
                embeddings=config.embeddings,
                type_k=KV_CACHE_TYPES[config.kv_cache_type],
                type_v=KV_CACHE_TYPES[config.kv_cache_type],
                # A quantized V cache requires it; otherwise as configured, or as llama.cpp decides (None).
                flash_attn=True if quantized_kv else config.flash_attention,
                adapters=adapters,
            )
        except BaseException:
            adapters.close()
            raise

    def new_embedding_context(
        self, model: backend.Model, config: LoadConfig, *, n_ctx: int, n_batch: int, n_seq_max: int
    ) -> LlamaEmbeddingContext:
        return LlamaEmbeddingContext(
            _native(model, LlamaModel), n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max, config=config
        )

    def new_batch(self, capacity: int, n_seq_max: int) -> Batch:
        return Batch(capacity, n_seq_max)

    def new_projector(self, model: backend.Model, config: LoadConfig, *, gpu_layers: int) -> backend.Projector:
        from .mtmd import MtmdProjector, route_logs  # loads libmtmd: only for models with a projector

        if config.projector_path is None:
            raise ValueError("this configuration names no projector")
        llama_model = _native(model, LlamaModel)
        route_logs(log_callback)
        return MtmdProjector(
            llama_model.handle,
            llama_model.path,
            config.projector_path,
            n_threads=config.num_thread or default_threads(),
            use_gpu=gpu_layers != 0 and supports_gpu_offload(),
        )

    def new_sampler(
        self, model: backend.Model, options: Options, *, grammar: str | None = None, n_ctx: int = 0
    ) -> SamplerChain:
        return SamplerChain(_native(model, LlamaModel), options, grammar=grammar, n_ctx=n_ctx)


def _native(value: object, kind: type[_T]) -> _T:
    """The llama.cpp object behind a backend-neutral one: objects of another backend cannot be mixed in."""
    if not isinstance(value, kind):
        raise TypeError(f"a llama.cpp {kind.__name__} was expected, not a {type(value).__name__}")
    return value
