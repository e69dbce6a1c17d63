"""Models by name through the Engine: create, list, show, copy, delete, and Modelfile settings at run time."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import localllm
from localllm import Engine, gguf


async def test_create_chat_by_name_list_show_copy_delete(smollm2_path: Path, home: Path) -> None:
    events: list[dict] = []
    async with Engine(home) as engine:
        await engine.create("smollm2", from_=smollm2_path, progress=events.append)
        assert events[-1]["status"] == "success"
        reply = await engine.chat("smollm2", [{"role": "user", "content": "Hi!"}], options={"num_predict": 4})
        assert reply.done and reply.model == "smollm2"
        (running,) = (await engine.ps()).models
        assert running.name == "smollm2:latest" and running.details.family == "llama"
        assert len(running.digest) == 64

        names = [m.name for m in (await engine.list()).models]
        assert names == ["smollm2:latest"]
        shown = await engine.show("SmolLM2")  # names compare case-insensitively
        assert shown.details.family == "llama"
        assert shown.details.quantization_level == "Q4_1"
        assert "completion" in shown.capabilities

        assert (await engine.copy("smollm2", "mine")).status == "success"
        assert sorted(m.name for m in (await engine.list()).models) == ["mine:latest", "smollm2:latest"]
        assert (await engine.delete("smollm2")).status == "success"  # loaded: it is unloaded first
        assert [m.name for m in (await engine.list()).models] == ["mine:latest"]
        assert (await engine.chat("mine", [{"role": "user", "content": "Hi"}], options={"num_predict": 2})).done
        with pytest.raises(localllm.ModelNotFound, match="smollm2"):
            await engine.chat("smollm2", [{"role": "user", "content": "Hi"}])
        with pytest.raises(localllm.InvalidModelName):
            await engine.create("../../etc/passwd", from_=smollm2_path)
        with pytest.raises(localllm.ModelNotFound):
            await engine.show("../../etc/passwd:latest")


async def test_modelfile_parameters_and_system_apply_with_request_winning(
    smollm2_path: Path, home: Path, tmp_path: Path
) -> None:
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(
        f'FROM {smollm2_path}\nPARAMETER temperature 0\nPARAMETER num_predict 7\nSYSTEM """You are a pirate."""\n'
    )
    async with Engine(home) as engine:
        await engine.create("pirate", modelfile=modelfile)
        default = await engine.chat("pirate", [{"role": "user", "content": "Who are you?"}])
        assert default.eval_count == 7  # the model's num_predict
        again = await engine.chat("pirate", [{"role": "user", "content": "Who are you?"}])
        assert again.message.content == default.message.content  # the model's temperature 0
        longer = await engine.chat("pirate", [{"role": "user", "content": "Who are you?"}], options={"num_predict": 12})
        assert longer.eval_count == 12  # the request wins
        with_system = await engine.chat(
            "pirate",
            [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Who are you?"}],
        )
        assert with_system.message.content == default.message.content  # SYSTEM was applied the same way
        shown = await engine.show("pirate")
        assert shown.system == "You are a pirate."
        assert "num_predict" in shown.parameters


async def test_unknown_option_in_a_request_warns_and_is_ignored(smollm2_path: Path, home: Path) -> None:
    async with Engine(home) as engine:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reply = await engine.generate(str(smollm2_path), "Hi", options={"num_predict": 2, "mirostat_x": 1})
    assert reply.done
    assert any("mirostat_x" in str(w.message) for w in caught)


async def test_list_tells_each_models_capabilities_as_show_does(
    smollm2_path: Path, minilm_gguf: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Engine(home) as engine:
        await engine.create("smollm2", from_=smollm2_path)
        await engine.create("minilm", from_=minilm_gguf)
        await engine.create("tooled", modelfile='FROM smollm2\nTEMPLATE """{{ .Tools }}{{ .Prompt }}"""\n')
        listed = {m.name: m.capabilities for m in (await engine.list()).models}
        assert listed == {
            "smollm2:latest": ["completion"],
            "minilm:latest": ["embedding"],
            "tooled:latest": ["completion", "tools"],  # the model's own TEMPLATE, not the GGUF's
        }
        for name, capabilities in listed.items():
            assert (await engine.show(name)).capabilities == capabilities

        reads: list[object] = []
        read_info = gguf.read_info

        def counted(path: str) -> gguf.GGUFInfo:
            reads.append(path)
            return read_info(path)

        monkeypatch.setattr(gguf, "read_info", counted)
        assert {m.name: m.capabilities for m in (await engine.list()).models} == listed
        assert reads == []  # a model's files are read once, not at every listing


async def test_show_lists_the_tensors_of_the_models_file(smollm2_path: Path, home: Path) -> None:
    async with Engine(home) as engine:
        await engine.create("smollm2", from_=smollm2_path)
        shown = await engine.show("smollm2")
    in_file = gguf.read_info(smollm2_path).tensors
    assert [(t.name, t.type, t.shape) for t in shown.tensors] == [(t.name, t.type_name, list(t.shape)) for t in in_file]
    assert shown.tensors[0] == localllm.ShowResponse.Tensor("token_embd.weight", "Q8_0", [576, 49152])
    assert shown.projector_info is None  # no projector


async def test_list_and_show_answer_the_public_types(smollm2_path: Path, home: Path) -> None:
    async with Engine(home) as engine:
        await engine.create("smollm2", from_=smollm2_path)
        (listed,) = (await engine.list()).models
        shown = await engine.show("smollm2")
    assert isinstance(listed, localllm.StoredModel) and isinstance(listed.details, localllm.ModelDetails)
    assert isinstance(shown, localllm.ShowResponse) and isinstance(shown.details, localllm.ModelDetails)
    assert listed.modified_at == shown.modified_at and listed.modified_at.tzinfo is not None
    assert (listed.details.context_length, shown.details.context_length) == (None, 8192)  # show reads the GGUF


async def test_create_takes_a_modelfile_and_fields_together(smollm2_path: Path, home: Path) -> None:
    """The fields add their lines after the Modelfile's, as the shim's ``/api/create`` gives them."""
    async with Engine(home) as engine:
        await engine.create("smollm2", from_=smollm2_path)
        await engine.create(
            "mixed",
            modelfile="FROM smollm2\nSYSTEM from the Modelfile\nPARAMETER temperature 0.1\n",
            system="from the field",
            parameters={"num_ctx": 1024},
            renderer="harmony",
            parser="harmony",
        )
        shown = await engine.show("mixed")
        resolved = engine.registry.resolve("mixed")
    assert shown.system == "from the field"  # the later SYSTEM wins, as in a Modelfile
    assert "temperature" in shown.parameters and "num_ctx" in shown.parameters
    assert (resolved.renderer, resolved.parser) == ("harmony", "harmony")
