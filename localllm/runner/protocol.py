"""What crosses between the engine and a runner: load configurations, sampling parameters, sequence handles.

This module does not import llama_cpp, so the engine can be imported without it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import attrs

from ..errors import LocalLLMError
from .mailbox import Mailbox

if TYPE_CHECKING:
    from .worker import Runner

__all__ = ["KV_CACHE_TYPES", "LoadConfig", "SamplingParams", "SequenceHandle", "SequenceResult"]

KV_CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids


@attrs.frozen
class LoadConfig:
    """Everything that decides how a model is loaded: equal configs share a runner."""

    model_path: str
    num_ctx: int = 4096
    num_batch: int = 512
    num_parallel: int = 4
    num_thread: int = 0
    num_gpu: int = -1  # requested GPU layers (-1: as many as fit); the scheduler's plan decides the real count
    main_gpu: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    embeddings: bool = False
    kv_cache_type: str = attrs.field(default="f16", validator=attrs.validators.in_(KV_CACHE_TYPES))
    adapters: tuple[str, ...] = ()
    flash_attention: bool = False
    repack: bool | None = None  # llama.cpp's extra CPU weight layouts; None: where known to be safe


@attrs.frozen
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1
    num_predict: int = -1
    stop: tuple[str, ...] = ()
    grammar: str | None = None


@attrs.frozen
class SequenceResult:
    """How a sequence ended, with Ollama's counters (durations in ns)."""

    done_reason: str
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    tokens: tuple[int, ...] = ()


class SequenceHandle:
    """The coroutine's side of one sequence: events in, cancellation out."""

    def __init__(self, runner: Runner, prompt: list[int], params: SamplingParams) -> None:
        self.runner = runner
        self.prompt = prompt
        self.params = params
        # Items: str (text), SequenceResult (done) or LocalLLMError (failed).
        self.mailbox: Mailbox[str | SequenceResult | LocalLLMError] = Mailbox()
        self.cancelled = threading.Event()
        self.finished = False

    def cancel(self) -> None:
        """Stop generating; the slot is freed within one decode step. Safe from any thread."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.runner._withdraw(self)


