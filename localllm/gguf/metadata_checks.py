"""The semantic checks on a parsed GGUF file's model metadata: architecture, general keys, hyperparameters
and tensors llama.cpp asserts on; and the typed reads of metadata values the checks share.
"""

from __future__ import annotations

from typing import Any, NoReturn

from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS

from localllm.errors import InvalidModelFile
from localllm.gguf.structure import (
    HINT_ARCH,
    HINT_CORRUPT,
    HINT_HPARAMS,
    HINT_TOKENIZER,
    INTEGER_TYPES,
    T_ARRAY,
    T_FLOAT32,
    T_STRING,
    VALUE_TYPE_NAMES,
    ParsedGGUF,
    describe_type,
)

__all__ = [
    "KNOWN_ARCHITECTURES",
    "array_value",
    "check_architecture",
    "check_general",
    "check_hparams",
    "check_tensors",
    "fail",
    "int_value",
    "string_value",
]

# Limits llama.cpp applies (llama-hparams.h).
MAX_LAYERS = 512
MAX_EXPERTS = 512
_INT32_MAX = (1 << 31) - 1

# The architecture names llama.cpp knows, as the gguf package (maintained with llama.cpp) lists them.
KNOWN_ARCHITECTURES: frozenset[str] = frozenset(MODEL_ARCH_NAMES.values())
# Architectures whose graph starts from a token embedding: their files must carry token_embd.weight.
_ARCHS_WITH_TOKEN_EMBD: frozenset[str] = frozenset(
    name for arch, name in MODEL_ARCH_NAMES.items() if MODEL_TENSOR.TOKEN_EMBD in MODEL_TENSORS.get(arch, ())
)


def fail(parsed: ParsedGGUF, message: str, hint: str) -> NoReturn:
    raise InvalidModelFile(f"{parsed.name}: {message}. {hint}")


def int_value(parsed: ParsedGGUF, key: str, hint: str = HINT_HPARAMS) -> int | None:
    entry = parsed.kv.get(key)
    if entry is None:
        return None
    if entry.type not in INTEGER_TYPES:
        fail(parsed, f"metadata key '{key}' must be an integer, but is a {describe_type(entry)}", hint)
    return int(entry.value)


def string_value(parsed: ParsedGGUF, key: str, hint: str = HINT_HPARAMS) -> bytes | None:
    entry = parsed.kv.get(key)
    if entry is None:
        return None
    if entry.type != T_STRING:
        fail(parsed, f"metadata key '{key}' must be a string, but is a {describe_type(entry)}", hint)
    value: bytes = entry.value
    return value


def array_value(parsed: ParsedGGUF, key: str, element_type: int, hint: str) -> Any:
    entry = parsed.kv.get(key)
    if entry is None:
        return None
    if entry.type != T_ARRAY or entry.element_type != element_type:
        fail(
            parsed,
            f"metadata key '{key}' must be an array of {VALUE_TYPE_NAMES[element_type]}, but is a "
            f"{describe_type(entry)}",
            hint,
        )
    return entry.value


def check_architecture(parsed: ParsedGGUF) -> str:
    raw = string_value(parsed, "general.architecture", HINT_ARCH)
    if raw is None:
        fail(parsed, "metadata key 'general.architecture' is missing", HINT_ARCH)
    arch = raw.decode("utf-8", "replace")
    if arch not in KNOWN_ARCHITECTURES:
        fail(parsed, f"unknown model architecture '{arch}' (general.architecture)", HINT_ARCH)
    return arch


def check_hparams(parsed: ParsedGGUF, arch: str) -> None:
    for suffix in ("context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size"):
        key = f"{arch}.{suffix}"
        entry = parsed.kv.get(key)
        if entry is None or entry.type == T_ARRAY:  # some architectures give per-layer arrays
            continue
        value = int_value(parsed, key)
        if value is not None and not 0 <= value <= _INT32_MAX:  # llama.cpp hands these out as int32
            fail(parsed, f"metadata key '{key}' is {value}, outside 0 to {_INT32_MAX}", HINT_HPARAMS)
    block_count = int_value(parsed, f"{arch}.block_count")
    if block_count is not None and not 0 <= block_count <= MAX_LAYERS:
        fail(
            parsed,
            f"metadata key '{arch}.block_count' is {block_count} (llama.cpp allows 0 to {MAX_LAYERS})",
            HINT_HPARAMS,
        )
    experts = int_value(parsed, f"{arch}.expert_count") or 0
    used = int_value(parsed, f"{arch}.expert_used_count") or 0
    if not 0 <= experts <= MAX_EXPERTS:
        fail(
            parsed,
            f"metadata key '{arch}.expert_count' is {experts} (llama.cpp allows 0 to {MAX_EXPERTS})",
            HINT_HPARAMS,
        )
    if used < 0 or used > experts or (experts > 0 and used == 0):
        fail(
            parsed,
            f"metadata key '{arch}.expert_used_count' is {used} with {arch}.expert_count {experts}: it must be "
            f"between 1 and the expert count (or 0 without experts)",
            HINT_HPARAMS,
        )


def check_tensors(parsed: ParsedGGUF, arch: str) -> None:
    if not parsed.tensors:
        fail(parsed, "the file holds no tensors", HINT_CORRUPT)
    kind = parsed.kv.get("general.type")
    if kind is not None and kind.type == T_STRING and kind.value.lower() in (b"adapter", b"mmproj", b"projector"):
        return  # LoRA adapters and projectors hold only the tensors they add to a model
    if arch in _ARCHS_WITH_TOKEN_EMBD and not any(t.name == "token_embd.weight" for t in parsed.tensors):
        fail(parsed, f"tensor 'token_embd.weight', which every '{arch}' model needs, is missing", HINT_CORRUPT)


# Keys llama.cpp reads with a typed getter that asserts the type (loading a LoRA adapter reads these).
_ASSERTED_TYPES = {"general.type": T_STRING, "adapter.type": T_STRING, "adapter.lora.alpha": T_FLOAT32}


def check_general(parsed: ParsedGGUF) -> None:
    int_value(parsed, "general.file_type")
    for key, value_type in _ASSERTED_TYPES.items():
        entry = parsed.kv.get(key)
        if entry is not None and entry.type != value_type:
            fail(
                parsed,
                f"metadata key '{key}' must be a {VALUE_TYPE_NAMES[value_type]}, but is a {describe_type(entry)}",
                HINT_HPARAMS,
            )
    for key, entry in parsed.kv.items():
        if (key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template.")) and entry.type != T_STRING:
            fail(parsed, f"metadata key '{key}' must be a string, but is a {describe_type(entry)}", HINT_TOKENIZER)
