"""Thinking through the coding agents' front doors (Anthropic's Messages, OpenAI's Responses), on a model
whose template thinks. The bundled model cannot think, so its compute is scripted (a fake backend) under
a thinking template: what is checked is how each API carries the thinking, not what a model thinks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from fakes import ScriptedBackend

import localllm
from localllm.http import ServerThread

# ChatML with Ollama's thinking fields, as Qwen's templates write them.
THINKING_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ if .Think }}<think>
{{ end }}"""
REPLY = "First, 2 + 2.\n</think>\n\nFour."
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerThread]:
    home = tmp_path_factory.mktemp("home")
    with localllm.Client(home) as client:
        client.create("thinker", modelfile=f'FROM {smollm2_path}\nTEMPLATE """{THINKING_TEMPLATE}"""\n')
    backend = ScriptedBackend(reply=REPLY)
    with ServerThread(lambda: localllm.Engine(home, backend=backend)) as running:
        yield running


def test_anthropic_messages_carry_thinking_blocks(server: ServerThread) -> None:
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60) as client:
        thinking = {"type": "enabled", "budget_tokens": 1024}
        message = client.messages.create(model="thinker", max_tokens=64, messages=QUESTION, thinking=thinking)
        assert [block.type for block in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == "First, 2 + 2.\n"  # type: ignore[union-attr]
        assert message.content[1].text == "Four."  # type: ignore[union-attr]
        with client.messages.stream(model="thinker", max_tokens=64, messages=QUESTION, thinking=thinking) as stream:
            events = list(stream)
            streamed = stream.get_final_message()
        assert [block.type for block in streamed.content] == ["thinking", "text"]
        assert (
            "".join(
                e.delta.thinking for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta"
            )
            == "First, 2 + 2.\n"
        )  # type: ignore[union-attr]
        assert streamed.content[1].text == "Four."  # type: ignore[union-attr]
        # Disabled, the prompt does not open the thinking and the reply is all text.
        plain = client.messages.create(model="thinker", max_tokens=64, messages=QUESTION, thinking={"type": "disabled"})
        assert [block.type for block in plain.content] == ["text"]


def test_openai_responses_carry_a_reasoning_item(server: ServerThread) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    response = client.responses.create(model="thinker", input="What is 2 + 2?", reasoning={"effort": "low"})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == "Four."
    reasoning = response.output[0]
    assert "First, 2 + 2." in "".join(part.text for part in (reasoning.content or reasoning.summary))  # type: ignore[union-attr]
    with client.responses.stream(model="thinker", input="What is 2 + 2?", reasoning={"effort": "low"}) as stream:
        for _event in stream:
            pass
        streamed = stream.get_final_response()
    assert [item.type for item in streamed.output] == ["reasoning", "message"]
    assert streamed.output_text == "Four."
