"""Write two tiny Hugging Face models and their reference logits for the converter tests.

- tiny_llama/: LlamaForCausalLM (2 layers, hidden 64, 4 query heads over 2 KV
  heads, tied embeddings), float32 safetensors, a byte-level BPE tokenizer
  with SmolLM's pre-tokenizer (single digits, then GPT-2's split) and a ChatML
  chat template.
- tiny_qwen2/: Qwen2ForCausalLM (q/k/v biases, untied output), bfloat16
  safetensors, a byte-level BPE tokenizer with Qwen2's split expression.

The weights are random (seeded): the tests check that llama.cpp, running the
converted GGUF, computes the same logits as transformers does here (and, for
last-token pooling, the same final hidden state). Run it
once, in an environment with torch, transformers and tokenizers:

    python tests/data/make_tiny_models.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello world! Hello there, how are you today? I am fine, thank you, and you?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000.
Language models predict the next token from the tokens before it.
def add(a, b):\n    return a + b\n
The rain in Spain stays mainly in the plain. To be, or not to be, that is the question.
Cats and dogs, birds and fish, apples and oranges, bread and butter.
"""

PROMPTS = [
    "Hello world! How are you today?",
    "The quick brown fox jumps over 13 lazy dogs.",
    "def add(a, b):\n    return a + b",
]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(kind: str, vocab_size: int) -> object:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if kind == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tokenizer


def build(kind: str, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1234 if kind == "smollm" else 4321)
    raw = train_tokenizer(kind, 384)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    vocab = len(fast)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    if kind == "smollm":
        config = LlamaConfig(**common, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False)
        model = Qwen2ForCausalLM(config)
    # Bigger than the default init so that the logits are far from uniform.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
            if kind != "smollm":  # the weights are stored as bfloat16: compute with exactly those values
                param.copy_(param.to(torch.bfloat16).to(torch.float32))
    model.eval()
    dtype = torch.float32 if kind == "smollm" else torch.bfloat16

    reference = []
    for prompt in PROMPTS:
        ids = fast(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            output = model(torch.tensor([ids]), output_hidden_states=True)
        logits = output.logits[0]
        last_hidden = output.hidden_states[-1][0, -1]  # after the final norm: what last-token pooling returns
        reference.append(
            {
                "prompt": prompt,
                "token_ids": ids,
                "logits": [[round(float(x), 5) for x in row] for row in logits],
                "last_hidden": [round(float(x), 6) for x in last_hidden],
            }
        )
    if folder.exists():
        shutil.rmtree(folder)
    # Casting the whole model also rounds the rotary inverse frequencies: save only after the reference is computed.
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    (folder / "reference.json").write_text(
        json.dumps({"dtype": str(dtype).removeprefix("torch."), "prompts": reference}, separators=(",", ":")) + "\n",
        encoding="utf-8",
    )
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {folder} ({size / 1e6:.2f} MB, vocabulary {vocab})")


def main() -> None:
    build("smollm", HERE / "tiny_llama")
    build("qwen2", HERE / "tiny_qwen2")


if __name__ == "__main__":
    main()
