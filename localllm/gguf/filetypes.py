"""GGUF file types: llama.cpp's ``llama_ftype`` values (the ``general.file_type`` key) and Ollama's names for them.

A fact of the file format, shared by what reads files (the registry, `show`)
and what writes them (the converter, the quantizer).
"""

from __future__ import annotations

from localllm.errors import InvalidRequest

__all__ = ["FILE_TYPES", "QUANTIZATION_TYPES", "UNQUANTIZED_TYPES", "file_type_name", "quantization_type"]

#: Ollama's names for llama_ftype values; gaps are retired types.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}

_IDS = {name: value for value, name in FILE_TYPES.items()}

#: What a model can be quantized to (Ollama's ``create --quantize``) -> (llama_ftype, approximate bits per
#: weight of 2-D tensors).
QUANTIZATION_TYPES: dict[str, tuple[int, float]] = {
    name: (_IDS[name], bits)
    for name, bits in {
        "F32": 32.0,
        "F16": 16.0,
        "BF16": 16.0,
        "Q8_0": 8.5,
        "Q4_0": 4.5,
        "Q4_1": 5.0,
        "Q5_0": 5.5,
        "Q5_1": 6.0,
        "Q2_K": 2.96,
        "Q3_K_S": 3.5,
        "Q3_K_M": 3.91,
        "Q3_K_L": 4.27,
        "Q4_K_S": 4.58,
        "Q4_K_M": 4.89,
        "Q5_K_S": 5.54,
        "Q5_K_M": 5.69,
        "Q6_K": 6.56,
    }.items()
}

#: What a model can be quantized from.
UNQUANTIZED_TYPES = ("F32", "F16", "BF16")


def file_type_name(value: int | None) -> str:
    """Ollama's name for a `general.file_type` value ("Q4_K_M", "F16", ...), or "unknown"."""
    if value is None:
        return "unknown"
    return FILE_TYPES.get(value, "unknown")


def quantization_type(name: str) -> str:
    """The canonical spelling of a quantization name ("q4_k_m" -> "Q4_K_M"); InvalidRequest if unknown."""
    if not isinstance(name, str) or name.upper() not in QUANTIZATION_TYPES:
        valid = ", ".join(k.lower() if k.startswith(("F", "BF")) else "q" + k[1:] for k in QUANTIZATION_TYPES)
        raise InvalidRequest(f"unknown quantization type {name!r}; valid types are: {valid}")
    return name.upper()
