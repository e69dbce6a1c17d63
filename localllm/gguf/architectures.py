"""What a model's architecture says about it: which ones are encoders that embed rather than generate."""

from __future__ import annotations

import functools
import os

__all__ = ["ENCODER_ARCHITECTURES", "describe_kind", "is_embedding_model"]

#: Bidirectional encoders: they see a whole input at once (no KV cache) and produce embeddings, not text.
ENCODER_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert", "t5encoder"}
)


def describe_kind(path: str | os.PathLike[str]) -> tuple[bool, str]:
    """(whether the GGUF at `path` is an embedding model, its architecture), read once per file version."""
    stat = os.stat(path)
    return _kind(os.fspath(path), stat.st_mtime_ns, stat.st_size)


def is_embedding_model(path: str | os.PathLike[str]) -> bool:
    """Whether the GGUF at `path` embeds: it declares a pooling type, or is a BERT-style encoder."""
    return describe_kind(path)[0]


@functools.lru_cache(maxsize=64)
def _kind(path: str, _mtime_ns: int, _size: int) -> tuple[bool, str]:
    from .inspect import read_info

    info = read_info(path)
    arch = (info.architecture or "").lower()
    return info.pooling_type is not None or arch in ENCODER_ARCHITECTURES, arch
