"""A tiny random-weight vision projector for tests: LLaVA's "mlp" type over a two-layer CLIP ViT.

The answers a model gives through it are meaningless; what it exercises is real: libmtmd loads it,
preprocesses each image to 32x32, encodes 16 patches and projects them to the text model's width.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

IMAGE_SIZE = 32
PATCH_SIZE = 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16: one embedding per patch, the class token dropped
_WIDTH = 32  # the ViT's hidden size
_FFN = 64
_LAYERS = 2
_HIDDEN = 64  # the projector's hidden size


def write_test_projector(path: Path, *, text_width: int = 576, seed: int = 0) -> Path:
    """Write the projector to `path`; `text_width` is the text model's embedding width (SmolLM2's: 576)."""
    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("general.name", "localllm test projector")
    writer.add_string("general.type", "mmproj")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.use_gelu", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", _WIDTH)
    writer.add_uint32("clip.vision.feed_forward_length", _FFN)
    writer.add_uint32("clip.vision.block_count", _LAYERS)
    writer.add_uint32("clip.vision.projection_dim", text_width)
    writer.add_uint32("clip.vision.attention.head_count", 2)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    n_pos = TOKENS_PER_IMAGE + 1  # the patches and the class token
    writer.add_tensor("v.patch_embd.weight", weights(_WIDTH, 3, PATCH_SIZE, PATCH_SIZE).astype(np.float16))
    writer.add_tensor("v.class_embd", weights(_WIDTH))
    writer.add_tensor("v.position_embd.weight", weights(n_pos, _WIDTH))
    writer.add_tensor("v.pre_ln.weight", np.ones(_WIDTH, np.float32))
    writer.add_tensor("v.pre_ln.bias", np.zeros(_WIDTH, np.float32))
    for layer in range(_LAYERS):
        block = f"v.blk.{layer}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{block}.{name}.weight", weights(_WIDTH, _WIDTH))
            writer.add_tensor(f"{block}.{name}.bias", weights(_WIDTH, scale=0.02))
        for norm in ("ln1", "ln2"):
            writer.add_tensor(f"{block}.{norm}.weight", np.ones(_WIDTH, np.float32))
            writer.add_tensor(f"{block}.{norm}.bias", np.zeros(_WIDTH, np.float32))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(_FFN, _WIDTH))
        writer.add_tensor(f"{block}.ffn_up.bias", weights(_FFN, scale=0.02))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(_WIDTH, _FFN))
        writer.add_tensor(f"{block}.ffn_down.bias", weights(_WIDTH, scale=0.02))
    writer.add_tensor("mm.0.weight", weights(_HIDDEN, _WIDTH))
    writer.add_tensor("mm.0.bias", weights(_HIDDEN, scale=0.02))
    writer.add_tensor("mm.2.weight", weights(text_width, _HIDDEN, scale=0.5))
    writer.add_tensor("mm.2.bias", weights(text_width, scale=0.02))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
