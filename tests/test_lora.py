"""LoRA adapters: a Modelfile ADAPTER loads through llama.cpp's adapter API, and another adapter reloads the runner."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from localllm import Engine

GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 16}
RANK = 4
N_EMBD = 576  # SmolLM2-135M
LAYERS = range(0, 30, 3)


def write_lora(path: Path, *, b_scale: float) -> Path:
    """A LoRA adapter for SmolLM2's attention Q and output projections (B = 0 makes it a no-op)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(RANK))
    for layer in LAYERS:
        for name in ("attn_q", "attn_output"):
            a = rng.standard_normal((RANK, N_EMBD)).astype(np.float32) * 0.5  # ggml ne = [n_in, rank]
            b = rng.standard_normal((N_EMBD, RANK)).astype(np.float32) * b_scale  # ggml ne = [rank, n_out]
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


async def test_lora_adapters_from_a_modelfile(smollm2_path: Path, home: Path, tmp_path: Path) -> None:
    zero = write_lora(tmp_path / "zero.gguf", b_scale=0.0)
    strong = write_lora(tmp_path / "strong.gguf", b_scale=0.5)
    prompt = "The three primary colours are"
    async with Engine(home) as engine:
        await engine.create("base", from_=smollm2_path)
        (tmp_path / "Zero").write_text(f"FROM base\nADAPTER {zero}\n")
        (tmp_path / "Strong").write_text(f"FROM base\nADAPTER {strong}\n")
        await engine.create("with-zero", modelfile=tmp_path / "Zero")
        await engine.create("with-strong", modelfile=tmp_path / "Strong")

        plain = await engine.generate("base", prompt, raw=True, options=GREEDY)
        unchanged = await engine.generate("with-zero", prompt, raw=True, options=GREEDY)
        changed = await engine.generate("with-strong", prompt, raw=True, options=GREEDY)
        loaded = [p.name for p in (await engine.ps()).models]
        loads = engine.scheduler.load_count

    assert unchanged.response == plain.response
    assert changed.response != plain.response
    # One runner per model file, as in Ollama: adapters are load options, so each model reloaded it.
    assert loaded == ["with-strong:latest"] and loads == 3
