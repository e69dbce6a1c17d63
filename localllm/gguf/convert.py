"""Converting a Hugging Face model folder (config.json, safetensors, tokenizer files) to GGUF.

Supported families:

- BERT (``BertModel``, ``BertForMaskedLM``): sentence-embedding models such as
  all-MiniLM-L6-v2. The WordPiece vocabulary becomes llama.cpp's ``bert``
  tokenizer; the pooling (mean, CLS or last token) comes from the
  sentence-transformers files (``modules.json`` and its Pooling module's
  ``config.json``) when they are there.
- Llama (``LlamaForCausalLM``, ``MistralForCausalLM``: Llama, SmolLM, Mistral)
  and Qwen2 (``Qwen2ForCausalLM``): grouped-query attention, tied or separate
  output embeddings, a byte-level BPE tokenizer (llama.cpp's ``gpt2`` model
  with its merges and pre-tokenizer type) and the chat template of
  ``tokenizer_config.json`` / ``chat_template.jinja``.

Tensors are read straight from the safetensors files through memory maps, one
at a time, and written as they are converted, so memory use stays near the
size of the largest tensor, not of the model. The output is written to a
temporary file next to the destination and renamed into place only when it is
complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..errors import ConversionError

__all__ = ["OUT_TYPES", "convert_hf_to_gguf", "is_hf_model_dir"]

log = logging.getLogger("localllm.convert")

Progress = Callable[[dict[str, Any]], None]

#: Output types: name -> llama_ftype value (general.file_type).
OUT_TYPES = {"f32": 0, "f16": 1, "bf16": 32}

_BERT_ARCHS = ("BertModel", "BertForMaskedLM")
_LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
_QWEN2_ARCHS = ("Qwen2ForCausalLM",)

# Pre-tokenizer split expressions of well-known byte-level BPE tokenizers -> llama.cpp's pre-tokenizer names.
_SPLIT_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _SPLIT_HEAD + r"\p{N}{1,3}" + _SPLIT_TAIL
_QWEN2_SPLIT = _SPLIT_HEAD + r"\p{N}" + _SPLIT_TAIL
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

# Token types (llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

# ggml types of the tensors written.
_GGML_F32, _GGML_F16, _GGML_BF16 = 0, 1, 30

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def is_hf_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` looks like a Hugging Face model folder (a config.json and safetensors weights)."""
    folder = Path(path)
    return folder.is_dir() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- safetensors, read lazily


@attrs.frozen
class _Stored:
    """Where one tensor's bytes are in a safetensors file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in bytes
    nbytes: int


def _read_safetensors_header(path: Path) -> dict[str, _Stored]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path.name} is not a safetensors file (too short)")
        length = int.from_bytes(head, "little")
        if length <= 0 or length > min(size - 8, 100 << 20):
            raise ConversionError(f"{path.name} is not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ConversionError(f"{path.name} has an unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path.name} has a malformed safetensors header")
    base = 8 + length
    tensors: dict[str, _Stored] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        if begin < 0 or end < begin or base + end > size:
            raise ConversionError(f"{path.name}: tensor {name!r} lies outside the file (is the file truncated?)")
        tensors[name] = _Stored(name, path, dtype, shape, base + begin, end - begin)
    return tensors


class _Weights:
    """Every tensor of a model folder's safetensors files, opened one at a time."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({folder / str(part) for part in weight_map.values()})
            except (ValueError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index.name} is malformed: {exc}") from None
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{folder} has no .safetensors weights")
        self.tensors: dict[str, _Stored] = {}
        for file in files:
            if not file.is_file():
                raise ConversionError(f"the weights file {file.name} is missing from {folder}")
            self.tensors.update(_read_safetensors_header(file))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def load(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (BF16 comes as uint16 bit patterns)."""
        stored = self.tensors[name]
        dtype = _SAFETENSORS_DTYPES.get(stored.dtype)
        if dtype is None:
            raise ConversionError(f"tensor {name!r} has dtype {stored.dtype}, which cannot be converted")
        count = math.prod(stored.shape)
        if count * np.dtype(dtype).itemsize != stored.nbytes:
            raise ConversionError(f"tensor {name!r}: {stored.nbytes} bytes do not hold shape {list(stored.shape)}")
        if count == 0:
            return np.zeros(stored.shape, dtype=dtype)
        return np.memmap(stored.file, dtype=dtype, mode="r", offset=stored.offset, shape=stored.shape)


def _to_float32(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(data, dtype=np.float32)


def _to_bf16(data: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaNs stay NaNs)."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(data)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


# --------------------------------------------------------------------------- what gets written


@attrs.frozen
class _Out:
    """One output tensor: its GGUF name and how to produce its data (in HF/numpy axis order)."""

    name: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]  # float32 or raw bfloat16 bits (uint16)
    source_dtype: str
    keep_f32: bool  # norms, biases, position and token-type embeddings stay F32 as llama.cpp expects
    source_bytes: int


@attrs.define
class _Vocab:
    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = attrs.field(factory=list)


@attrs.define
class _Plan:
    arch: str
    hparams: list[tuple[str, tuple[Any, ...]]]  # (writer method, args)
    vocab: _Vocab
    special_vocab: Any
    tensors: list[_Out]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path.parent} has no {path.name} ({what})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None


def _require(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    raise ConversionError(f"config.json has no {' or '.join(keys)}")


def _expect(weights: _Weights, name: str, shape: tuple[int, ...]) -> None:
    if name not in weights:
        raise ConversionError(f"the weights have no tensor {name!r}")
    actual = weights.shape(name)
    if actual != shape:
        raise ConversionError(f"tensor {name!r} has shape {list(actual)}, expected {list(shape)} from config.json")


def _plain(weights: _Weights, hf_name: str, gguf_name: str, *, keep_f32: bool = False) -> _Out:
    stored = weights.tensors[hf_name]
    return _Out(
        name=gguf_name,
        shape=stored.shape,
        produce=lambda: weights.load(hf_name),
        source_dtype=stored.dtype,
        keep_f32=keep_f32 or len(stored.shape) <= 1,
        source_bytes=stored.nbytes,
    )


# --------------------------------------------------------------------------- tokenizers


def _added_tokens(tokenizer: Mapping[str, Any]) -> dict[int, Mapping[str, Any]]:
    added: dict[int, Mapping[str, Any]] = {}
    for entry in tokenizer.get("added_tokens") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("id"), int) and isinstance(entry.get("content"), str):
            added[entry["id"]] = entry
    return added


def _wordpiece_vocab(folder: Path, vocab_size: int) -> _Vocab:
    """A BERT WordPiece vocabulary in llama.cpp's form: word-initial pieces get a leading U+2581, '##' goes."""
    vocab: dict[str, int] = {}
    added: dict[int, Mapping[str, Any]] = {}
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        tokenizer = _read_json(tokenizer_json, "the tokenizer")
        model = tokenizer.get("model") or {}
        if model.get("type") != "WordPiece":
            raise ConversionError(f"a BERT model needs a WordPiece tokenizer; tokenizer.json has {model.get('type')!r}")
        vocab = {str(k): int(v) for k, v in (model.get("vocab") or {}).items()}
        added = _added_tokens(tokenizer)
    elif (folder / "vocab.txt").is_file():
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        vocab = {line: i for i, line in enumerate(lines) if line}
        config = _read_json(folder / "tokenizer_config.json", "the tokenizer settings")
        for key in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
            token = config.get(key)
            if isinstance(token, str) and token in vocab:
                added[vocab[token]] = {"content": token, "special": True}
    else:
        raise ConversionError(f"{folder} has neither tokenizer.json nor vocab.txt")
    for token_id, entry in added.items():
        vocab[str(entry["content"])] = token_id
    size = max(vocab_size, max(vocab.values(), default=-1) + 1)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        elif i in added and added[i].get("special", True):
            tokens.append(token)
            types.append(_CONTROL)
        else:
            tokens.append(token[2:] if token.startswith("##") else "\u2581" + token)
            types.append(_USER_DEFINED if i in added else _NORMAL)
    return _Vocab(model="bert", pre="default", tokens=tokens, types=types)


def _pre_tokenizer_name(tokenizer: Mapping[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, judged from tokenizer.json."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = [s for s in steps or [] if isinstance(s, Mapping)]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    for step in steps:
        if step.get("type") == "Split":
            pattern = (step.get("pattern") or {}).get("Regex")
            if pattern in _SPLIT_PRE:
                return _SPLIT_PRE[pattern]
    log.warning("unrecognised pre-tokenizer %s; llama.cpp will use its default splitting", kinds)
    return "default"


def _bpe_vocab(folder: Path, vocab_size: int) -> _Vocab:
    tokenizer = _read_json(folder / "tokenizer.json", "the tokenizer")
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        kind = model.get("type")
        raise ConversionError(f"only byte-level BPE tokenizers are supported here; tokenizer.json has {kind!r}")
    if model.get("byte_fallback"):
        raise ConversionError("SentencePiece-style BPE tokenizers (byte_fallback) are not supported yet")
    vocab = {str(k): int(v) for k, v in (model.get("vocab") or {}).items()}
    added = _added_tokens(tokenizer)
    for token_id, entry in added.items():
        vocab[str(entry["content"])] = token_id
    size = max(vocab_size, max(vocab.values(), default=-1) + 1)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        elif i in added:
            special = bool(added[i].get("special")) or (token.startswith(("<|", "[")) and token.endswith(("|>", "]")))
            tokens.append(token)
            types.append(_CONTROL if special else _USER_DEFINED)
        else:
            tokens.append(token)
            types.append(_NORMAL)
    return _Vocab(model="gpt2", pre=_pre_tokenizer_name(tokenizer), tokens=tokens, types=types)


def _special_vocab(folder: Path, n_vocab: int, *, merges: bool) -> Any:
    import gguf

    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    special.special_token_ids.pop("cls", None)  # GGUF has no CLS key: BOS plays that part
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = _read_json(config_path, "the tokenizer settings")
        for key in ("bos", "eos"):
            value = config.get(f"add_{key}_token")
            if isinstance(value, bool):
                special.add_special_token[key] = value
    return special


# --------------------------------------------------------------------------- families


def _pooling_type(folder: Path) -> int | None:
    """The sentence-transformers pooling of the model (llama_pooling_type), if the folder says."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return None
    modules = _read_json(modules_path, "the sentence-transformers modules")
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, Mapping) and str(module.get("type", "")).endswith(".Pooling"):
            config = _read_json(folder / str(module.get("path", "")) / "config.json", "the pooling settings")
            if config.get("pooling_mode_mean_tokens"):
                return 1
            if config.get("pooling_mode_cls_token"):
                return 2
            if config.get("pooling_mode_lasttoken"):
                return 3
            modes = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
            raise ConversionError(f"unsupported sentence-transformers pooling {modes}; mean, CLS or last token work")
    return None


def _bert_plan(folder: Path, config: Mapping[str, Any], weights: _Weights) -> _Plan:
    if str(config.get("position_embedding_type", "absolute")) != "absolute":
        raise ConversionError(f"BERT with {config.get('position_embedding_type')} position embeddings is not supported")
    act = str(config.get("hidden_act", "gelu"))
    if act != "gelu":
        raise ConversionError(f"BERT with the {act!r} activation is not supported (llama.cpp's BERT uses gelu)")
    n_embd = int(_require(config, "hidden_size"))
    n_ff = int(_require(config, "intermediate_size"))
    n_layer = int(_require(config, "num_hidden_layers"))
    n_head = int(_require(config, "num_attention_heads"))
    n_ctx = int(_require(config, "max_position_embeddings"))
    n_vocab = int(_require(config, "vocab_size"))
    n_types = int(config.get("type_vocab_size", 2))

    # Accept "bert."-prefixed names and old LayerNorm gamma/beta names.
    aliases: dict[str, str] = {}
    for name in weights.names():
        plain = name.removeprefix("bert.")
        if plain.endswith(".gamma"):
            plain = plain[: -len(".gamma")] + ".weight"
        elif plain.endswith(".beta"):
            plain = plain[: -len(".beta")] + ".bias"
        aliases.setdefault(plain, name)

    tensors: list[_Out] = []

    def add(hf: str, gguf_name: str, shape: tuple[int, ...], *, keep_f32: bool = False) -> None:
        source = aliases.get(hf)
        if source is None:
            raise ConversionError(f"the weights have no tensor {hf!r}")
        _expect(weights, source, shape)
        tensors.append(_plain(weights, source, gguf_name, keep_f32=keep_f32))

    add("embeddings.word_embeddings.weight", "token_embd.weight", (n_vocab, n_embd))
    add("embeddings.token_type_embeddings.weight", "token_types.weight", (n_types, n_embd), keep_f32=True)
    add("embeddings.position_embeddings.weight", "position_embd.weight", (n_ctx, n_embd), keep_f32=True)
    add("embeddings.LayerNorm.weight", "token_embd_norm.weight", (n_embd,))
    add("embeddings.LayerNorm.bias", "token_embd_norm.bias", (n_embd,))
    for i in range(n_layer):
        hf, out = f"encoder.layer.{i}.", f"blk.{i}."
        for part, name in (("query", "attn_q"), ("key", "attn_k"), ("value", "attn_v")):
            add(f"{hf}attention.self.{part}.weight", f"{out}{name}.weight", (n_embd, n_embd))
            add(f"{hf}attention.self.{part}.bias", f"{out}{name}.bias", (n_embd,))
        add(f"{hf}attention.output.dense.weight", f"{out}attn_output.weight", (n_embd, n_embd))
        add(f"{hf}attention.output.dense.bias", f"{out}attn_output.bias", (n_embd,))
        add(f"{hf}attention.output.LayerNorm.weight", f"{out}attn_output_norm.weight", (n_embd,))
        add(f"{hf}attention.output.LayerNorm.bias", f"{out}attn_output_norm.bias", (n_embd,))
        add(f"{hf}intermediate.dense.weight", f"{out}ffn_up.weight", (n_ff, n_embd))
        add(f"{hf}intermediate.dense.bias", f"{out}ffn_up.bias", (n_ff,))
        add(f"{hf}output.dense.weight", f"{out}ffn_down.weight", (n_embd, n_ff))
        add(f"{hf}output.dense.bias", f"{out}ffn_down.bias", (n_embd,))
        add(f"{hf}output.LayerNorm.weight", f"{out}layer_output_norm.weight", (n_embd,))
        add(f"{hf}output.LayerNorm.bias", f"{out}layer_output_norm.bias", (n_embd,))

    vocab = _wordpiece_vocab(folder, n_vocab)
    if len(vocab.tokens) != n_vocab:
        raise ConversionError(f"the tokenizer has {len(vocab.tokens)} tokens but the embeddings hold {n_vocab}")
    hparams: list[tuple[str, tuple[Any, ...]]] = [
        ("add_context_length", (n_ctx,)),
        ("add_embedding_length", (n_embd,)),
        ("add_feed_forward_length", (n_ff,)),
        ("add_block_count", (n_layer,)),
        ("add_head_count", (n_head,)),
        ("add_layer_norm_eps", (float(config.get("layer_norm_eps", 1e-12)),)),
        ("add_causal_attention", (False,)),
        ("add_token_type_count", (n_types,)),
    ]
    pooling = _pooling_type(folder)
    if pooling is not None:
        hparams.append(("add_pooling_type", (pooling,)))
    special = _special_vocab(folder, len(vocab.tokens), merges=False)
    _fill_bert_special_ids(folder, vocab, special.special_token_ids)
    # BERT ends inputs with [SEP], not an end-of-generation token: an EOS id would only confuse llama.cpp.
    special.special_token_ids.pop("eos", None)
    special.add_special_token.pop("eos", None)
    special.add_special_token["bos"] = True  # [CLS] first
    special.add_special_token["sep"] = True  # [SEP] last
    return _Plan("bert", hparams, vocab, special, tensors)


def _fill_bert_special_ids(folder: Path, vocab: _Vocab, ids: dict[str, int]) -> None:
    """Special token ids from tokenizer_config.json's token names, where tokenizer.json did not give them."""
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = _read_json(config_path, "the tokenizer settings")
    control = {token: i for i, token in enumerate(vocab.tokens) if vocab.types[i] == _CONTROL}
    for kind, key in (("bos", "cls_token"), ("unk", "unk_token"), ("sep", "sep_token"), ("pad", "pad_token")):
        token = config.get(key)
        if isinstance(token, str) and token in control:
            ids.setdefault(kind, control[token])
    mask = config.get("mask_token")
    if isinstance(mask, str) and mask in control:
        ids.setdefault("mask", control[mask])


def _permuted(weights: _Weights, hf_name: str, n_head: int) -> Callable[[], np.ndarray]:
    """Rows of a q/k projection reordered from Hugging Face's rotary layout to llama.cpp's (llama arch)."""

    def produce() -> np.ndarray:
        data = weights.load(hf_name)
        rows = data.shape[0]
        head_dim = rows // n_head
        return np.asarray(data.reshape(n_head, 2, head_dim // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape))

    return produce


def _rope_settings(config: Mapping[str, Any]) -> tuple[float, Mapping[str, Any] | None]:
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, None if kind in (None, "default") else params
    scaling = config.get("rope_scaling")
    theta = float(config.get("rope_theta", 10000.0))
    if isinstance(scaling, Mapping) and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        return theta, scaling
    return theta, None


def _llama3_rope_factors(scaling: Mapping[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1-style rope scaling (llama.cpp's rope_freqs tensor)."""
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < original / high,
        1.0,
        np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)


def _decoder_plan(folder: Path, config: Mapping[str, Any], weights: _Weights, arch: str) -> _Plan:
    act = str(config.get("hidden_act", "silu"))
    if act != "silu":
        raise ConversionError(f"the {act!r} activation is not supported for {arch} (it uses silu)")
    n_embd = int(_require(config, "hidden_size"))
    n_ff = int(_require(config, "intermediate_size"))
    n_layer = int(_require(config, "num_hidden_layers"))
    n_head = int(_require(config, "num_attention_heads"))
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    n_ctx = int(_require(config, "max_position_embeddings"))
    n_vocab = int(_require(config, "vocab_size"))
    eps = float(_require(config, "rms_norm_eps"))
    tied = bool(config.get("tie_word_embeddings", False))
    theta, scaling = _rope_settings(config)
    if n_head % n_head_kv:
        raise ConversionError(f"{n_head} attention heads cannot be grouped over {n_head_kv} key/value heads")
    if head_dim % 2:
        raise ConversionError(f"head_dim must be even for rotary embeddings, got {head_dim}")

    tensors: list[_Out] = []
    permute = arch == "llama"
    q_rows, kv_rows = n_head * head_dim, n_head_kv * head_dim

    def add(hf: str, out: str, shape: tuple[int, ...], *, heads: int = 0) -> None:
        _expect(weights, hf, shape)
        item = _plain(weights, hf, out)
        if heads:
            item = attrs.evolve(item, produce=_permuted(weights, hf, heads))
        tensors.append(item)

    add("model.embed_tokens.weight", "token_embd.weight", (n_vocab, n_embd))
    add("model.norm.weight", "output_norm.weight", (n_embd,))
    if not tied:
        if "lm_head.weight" in weights:
            add("lm_head.weight", "output.weight", (n_vocab, n_embd))
        else:
            log.warning("no lm_head.weight: llama.cpp will use the token embeddings as the output")
    biases = arch == "qwen2" or bool(config.get("attention_bias"))
    for i in range(n_layer):
        hf, out = f"model.layers.{i}.", f"blk.{i}."
        add(f"{hf}input_layernorm.weight", f"{out}attn_norm.weight", (n_embd,))
        add(f"{hf}self_attn.q_proj.weight", f"{out}attn_q.weight", (q_rows, n_embd), heads=n_head if permute else 0)
        add(f"{hf}self_attn.k_proj.weight", f"{out}attn_k.weight", (kv_rows, n_embd), heads=n_head_kv if permute else 0)
        add(f"{hf}self_attn.v_proj.weight", f"{out}attn_v.weight", (kv_rows, n_embd))
        if biases:
            add(f"{hf}self_attn.q_proj.bias", f"{out}attn_q.bias", (q_rows,), heads=n_head if permute else 0)
            add(f"{hf}self_attn.k_proj.bias", f"{out}attn_k.bias", (kv_rows,), heads=n_head_kv if permute else 0)
            add(f"{hf}self_attn.v_proj.bias", f"{out}attn_v.bias", (kv_rows,))
        add(f"{hf}self_attn.o_proj.weight", f"{out}attn_output.weight", (n_embd, q_rows))
        if config.get("attention_bias") and f"{hf}self_attn.o_proj.bias" in weights:
            add(f"{hf}self_attn.o_proj.bias", f"{out}attn_output.bias", (n_embd,))
        add(f"{hf}post_attention_layernorm.weight", f"{out}ffn_norm.weight", (n_embd,))
        add(f"{hf}mlp.gate_proj.weight", f"{out}ffn_gate.weight", (n_ff, n_embd))
        add(f"{hf}mlp.up_proj.weight", f"{out}ffn_up.weight", (n_ff, n_embd))
        add(f"{hf}mlp.down_proj.weight", f"{out}ffn_down.weight", (n_embd, n_ff))

    hparams: list[tuple[str, tuple[Any, ...]]] = [
        ("add_vocab_size", (n_vocab,)),
        ("add_context_length", (n_ctx,)),
        ("add_embedding_length", (n_embd,)),
        ("add_feed_forward_length", (n_ff,)),
        ("add_block_count", (n_layer,)),
        ("add_head_count", (n_head,)),
        ("add_head_count_kv", (n_head_kv,)),
        ("add_rope_freq_base", (theta,)),
        ("add_layer_norm_rms_eps", (eps,)),
        ("add_rope_dimension_count", (head_dim,)),
    ]
    if head_dim != n_embd // n_head:
        hparams += [("add_key_length", (head_dim,)), ("add_value_length", (head_dim,))]
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            hparams.append(("add_rope_scaling_type", ("linear",)))
            hparams.append(("add_rope_scaling_factor", (float(scaling["factor"]),)))
        elif kind == "llama3":
            factors = _llama3_rope_factors(scaling, theta, head_dim)
            tensors.append(
                _Out("rope_freqs.weight", factors.shape, lambda: factors, "F32", keep_f32=True, source_bytes=0)
            )
        else:
            raise ConversionError(f"rope scaling {kind!r} is not supported (none, linear and llama3 are)")
    pooling = _pooling_type(folder)
    if pooling is not None:
        hparams.append(("add_pooling_type", (pooling,)))

    vocab = _bpe_vocab(folder, n_vocab)
    if len(vocab.tokens) != n_vocab:
        raise ConversionError(f"the tokenizer has {len(vocab.tokens)} tokens but the embeddings hold {n_vocab}")
    special = _special_vocab(folder, len(vocab.tokens), merges=True)
    # What the Hugging Face tokenizer adds, and nothing else (llama.cpp's defaults vary by pre-tokenizer).
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    if not special.merges:
        raise ConversionError("tokenizer.json has no BPE merges")
    return _Plan(arch, hparams, vocab, special, tensors)


def _plan(folder: Path) -> _Plan:
    config = _read_json(folder / "config.json", "the model configuration")
    if not isinstance(config, dict):
        raise ConversionError("config.json is not a JSON object")
    archs = config.get("architectures") or []
    arch = str(archs[0]) if isinstance(archs, list) and archs else ""
    if not arch:
        arch = {"bert": "BertModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
            str(config.get("model_type", "")), ""
        )
    weights = _Weights(folder)
    if arch in _BERT_ARCHS:
        return _bert_plan(folder, config, weights)
    if arch in _LLAMA_ARCHS:
        return _decoder_plan(folder, config, weights, "llama")
    if arch in _QWEN2_ARCHS:
        return _decoder_plan(folder, config, weights, "qwen2")
    known = ", ".join(_BERT_ARCHS + _LLAMA_ARCHS + _QWEN2_ARCHS)
    raise ConversionError(f"cannot convert architecture {arch or '(none given)'!r}; supported: {known}")


# --------------------------------------------------------------------------- writing


def _out_data(item: _Out, out_type: str) -> tuple[np.ndarray, int]:
    """The data to write for `item` and its ggml type."""
    data = item.produce()
    if item.keep_f32 or out_type == "f32":
        return np.ascontiguousarray(_to_float32(data, item.source_dtype)), _GGML_F32
    if out_type == "bf16":
        if item.source_dtype == "BF16":
            return np.ascontiguousarray(data, dtype=np.uint16), _GGML_BF16
        return _to_bf16(_to_float32(data, item.source_dtype)), _GGML_BF16
    if item.source_dtype == "F16":
        return np.ascontiguousarray(data, dtype=np.float16), _GGML_F16
    return _to_float32(data, item.source_dtype).astype(np.float16), _GGML_F16


def _out_ggml_type(item: _Out, out_type: str) -> int:
    if item.keep_f32 or out_type == "f32":
        return _GGML_F32
    return _GGML_BF16 if out_type == "bf16" else _GGML_F16


def _model_name(folder: Path, config_path: Path) -> str:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        name = str(config.get("_name_or_path") or "")
    except (OSError, ValueError):
        name = ""
    return (name.rstrip("/").rsplit("/", 1)[-1] or folder.resolve().name).strip() or "model"


def convert_hf_to_gguf(
    src_dir: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    *,
    out_type: str = "f16",
    progress: Progress | None = None,
) -> Path:
    """Convert the Hugging Face model in `src_dir` to a GGUF file at `dst_path`; return its path.

    `out_type` is "f32", "f16" or "bf16" (norms, biases and position
    embeddings stay F32 whatever it is). `progress`, if given, receives
    ``{"status": "converting model", "total": bytes, "completed": bytes}``
    events. Unsupported architectures, missing tensors and shape mismatches
    raise ConversionError naming what is wrong; nothing is left at
    `dst_path` unless the conversion completes.
    """
    import gguf

    emit: Progress = progress or (lambda _event: None)
    folder = Path(src_dir).expanduser()
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder with a Hugging Face model")
    kind = str(out_type).lower()
    if kind not in OUT_TYPES:
        raise ConversionError(f"out_type must be one of {', '.join(OUT_TYPES)}; got {out_type!r}")
    dst = Path(dst_path).expanduser()
    if dst.is_dir():
        raise ConversionError(f"{dst} is a folder; give the path of the .gguf file to write")

    plan = _plan(folder)
    total = sum(t.source_bytes for t in plan.tensors)
    emit({"status": "converting model", "total": total, "completed": 0})

    writer = gguf.GGUFWriter(path=None, arch=plan.arch)
    pooling_key = f"{plan.arch}.pooling_type"
    writer.add_name(_model_name(folder, folder / "config.json"))
    writer.add_file_type(OUT_TYPES[kind])
    for method, args in plan.hparams:
        if method == "add_pooling_type":
            writer.add_uint32(pooling_key, int(args[0]))
        else:
            getattr(writer, method)(*args)
    writer.add_tokenizer_model(plan.vocab.model)
    writer.add_tokenizer_pre(plan.vocab.pre)
    writer.add_token_list(plan.vocab.tokens)
    writer.add_token_types(plan.vocab.types)
    plan.special_vocab.add_to_gguf(writer, quiet=True)

    itemsize = {_GGML_F32: 4, _GGML_F16: 2, _GGML_BF16: 2}
    numpy_types: dict[int, Any] = {_GGML_F32: np.float32, _GGML_F16: np.float16, _GGML_BF16: np.uint16}
    for item in plan.tensors:
        ggml_type = _out_ggml_type(item, kind)
        nbytes = math.prod(item.shape) * itemsize[ggml_type]
        writer.add_tensor_info(
            item.name,
            item.shape,
            np.dtype(numpy_types[ggml_type]),
            nbytes,
            raw_dtype=gguf.GGMLQuantizationType(ggml_type) if ggml_type == _GGML_BF16 else None,
        )

    dst.parent.mkdir(parents=True, exist_ok=True)
    temp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.partial")
    try:
        writer.write_header_to_file(path=temp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        for item in plan.tensors:
            data, ggml_type = _out_data(item, kind)
            if tuple(data.shape) != item.shape or ggml_type != _out_ggml_type(item, kind):
                raise ConversionError(f"tensor {item.name!r} came out with shape {list(data.shape)}")
            writer.write_tensor_data(data)
            del data
            done += item.source_bytes
            emit({"status": "converting model", "total": total, "completed": done})
        writer.close()
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, dst)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise
    log.info("converted %s to %s (%s)", folder, dst, kind)
    return dst
