"""Quantizing a GGUF file with llama.cpp's own quantizer (``llama_model_quantize``).

Names follow Ollama's ``create --quantize``: q8_0, q4_0, q4_1, q5_0, q5_1,
q2_K, q3_K_S, q3_K_M, q3_K_L, q4_K_S, q4_K_M, q5_K_S, q5_K_M, q6_K (any
letter case), plus f32, f16 and bf16. The source must be an F32, F16 or BF16
model, as in Ollama. llama.cpp reports no progress while it quantizes, so
progress events count the bytes written so far against an estimate of the
final size, a few times a second. The result goes to a temporary file next to
the destination and is renamed into place only when llama.cpp succeeded.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..gguf.filetypes import QUANTIZATION_TYPES, quantization_type
from ..gguf.filetypes import UNQUANTIZED_TYPES as _SOURCE_TYPES

__all__ = ["QUANTIZATION_TYPES", "quantization_type", "quantize_gguf"]

log = logging.getLogger("localllm.quantize")

Progress = Callable[[dict[str, Any]], None]

_POLL_SECONDS = 0.25


def _estimate_bytes(info: Any, bits: float) -> int:
    total = 0
    for tensor in info.tensors:
        if len(tensor.shape) >= 2 and tensor.name.endswith(".weight"):
            total += int(tensor.n_elements * bits / 8)
        else:
            total += tensor.n_elements * 4
    return total + 1_000_000  # metadata and alignment


def quantize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    ftype_name: str = "q4_K_M",
    nthread: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Quantize the GGUF model `src` to `ftype_name`, writing `dst`; return its path.

    `nthread` 0 uses every core. `progress` receives
    ``{"status": "quantizing F16 model to Q4_K_M", "total": bytes, "completed": bytes}``
    events (the total is an estimate until the last event, which gives the
    real size). Unknown types raise InvalidRequest listing the valid ones; a
    source that is already quantized, or a failure inside llama.cpp, raises
    ConversionError.
    """
    import llama_cpp

    from ..gguf import read_info, validate_file
    from .llama import ensure_backend

    target = quantization_type(ftype_name)
    ftype, bits = QUANTIZATION_TYPES[target]
    source = Path(src).expanduser()
    destination = Path(dst).expanduser()
    if not source.is_file():
        raise ConversionError(f"no such model file: {source}")
    if destination.is_dir():
        raise ConversionError(f"{destination} is a folder; give the path of the .gguf file to write")
    validate_file(source)
    info = read_info(source)
    source_type = info.file_type
    if source_type not in _SOURCE_TYPES:
        # Files without general.file_type: judge from the 2-D weights.
        kinds = {t.type_name for t in info.tensors if len(t.shape) >= 2}
        if kinds and kinds <= set(_SOURCE_TYPES):
            source_type = "F16" if "F16" in kinds else sorted(kinds)[0]
        else:
            raise ConversionError(f"only F32, F16 and BF16 models can be quantized; {source.name} is {source_type}")
    status = f"quantizing {source_type} model to {target}"
    estimate = _estimate_bytes(info, bits)
    emit: Progress = progress or (lambda _event: None)

    ensure_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = max(0, int(nthread))
    params.ftype = ftype
    params.allow_requantize = False
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.partial")
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["status"] = int(llama_cpp.llama_model_quantize(str(source).encode(), str(temp).encode(), params))
        except BaseException as exc:  # reported by the waiting thread
            outcome["error"] = exc

    started = time.perf_counter()
    emit({"status": status, "total": estimate, "completed": 0})
    thread = threading.Thread(target=work, name="localllm-quantize", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(_POLL_SECONDS)
            if thread.is_alive():
                try:
                    written = temp.stat().st_size
                except FileNotFoundError:
                    written = 0
                emit({"status": status, "total": estimate, "completed": min(written, estimate - 1)})
        if "error" in outcome:
            raise ConversionError(f"quantizing {source.name} failed: {outcome['error']}")
        if outcome.get("status") != 0 or not temp.is_file():
            raise ConversionError(
                f"llama.cpp could not quantize {source.name} to {target} (status {outcome.get('status')}); "
                "see the localllm.llama_cpp log for why"
            )
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, destination)
    except BaseException:
        thread.join()  # llama.cpp cannot be interrupted: let it finish before removing its output
        temp.unlink(missing_ok=True)
        raise
    size = destination.stat().st_size
    emit({"status": status, "total": size, "completed": size})
    log.info("quantized %s to %s (%s) in %.1fs", source, destination, target, time.perf_counter() - started)
    return destination
