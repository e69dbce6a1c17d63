"""The registry service over a real GGUF: create, resolve, list, show, copy, delete, prune."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from localllm.errors import InvalidModelFile, InvalidModelName, ModelfileError, ModelNotFound
from localllm.registry import Modelfile, Registry, parse_modelfile
from localllm.registry.registry import format_parameters, model_capabilities
from localllm.registry.store import MEDIA_CONFIG, MEDIA_MODEL, MEDIA_PARAMS, MEDIA_SYSTEM, MEDIA_TEMPLATE, go_json

CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
)


def blob_names(registry: Registry) -> set[str]:
    return {p.name for p in registry.store.blobs_dir.iterdir()}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Registry:
    """One registry with smollm2 and a derived model, for tests that only read."""
    reg = Registry(tmp_path_factory.mktemp("shared") / "models")
    reg.create("smollm2", from_=smollm2_path)
    reg.create(
        "pirate",
        modelfile=(
            "FROM smollm2\n"
            f'TEMPLATE """{CHATML}"""\n'
            "SYSTEM You are a pirate.\n"
            "PARAMETER temperature 0.2\n"
            'PARAMETER stop "<|im_end|>"\n'
            "PARAMETER stop <|endoftext|>\n"
            "PARAMETER num_ctx 2048\n"
            "MESSAGE user Who are you?\n"
            "MESSAGE assistant Arr, a pirate.\n"
            "LICENSE Apache-2.0\n"
        ),
    )
    return reg


# ---------------------------------------------------------------- create from a GGUF


def test_create_from_gguf(registry: Registry, smollm2_path: Path) -> None:
    events: list[dict[str, Any]] = []
    registry.create("SmolLM2", from_=smollm2_path, progress=events.append)
    statuses = [e["status"] for e in events]
    digest = "sha256:" + hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    assert f"copying file {digest}" in statuses
    assert statuses[-2:] == ["writing manifest", "success"]

    manifest_path = registry.models_dir / "manifests" / "registry.ollama.ai" / "library" / "SmolLM2" / "latest"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == MEDIA_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [MEDIA_MODEL]
    assert manifest["layers"][0]["digest"] == digest
    assert manifest["layers"][0]["size"] == smollm2_path.stat().st_size

    config = json.loads(registry.store.read_blob(manifest["config"]["digest"]))
    assert config["model_format"] == "gguf"
    assert config["model_family"] == "llama"
    assert config["model_families"] == ["llama"]
    assert config["model_type"] == "134.52M"
    assert config["file_type"] == "Q4_1"
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [digest]}

    blob = registry.store.blob_path(digest)
    assert not os.path.samefile(blob, smollm2_path)  # copied, never linked: the source stays the user's to edit

    resolved = registry.resolve("smollm2")
    assert resolved.name == "SmolLM2:latest"
    assert resolved.model_path == blob
    assert resolved.params == {} and resolved.template is None and resolved.system is None
    assert resolved.digest == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    assert resolved["name"] == "SmolLM2:latest"


def test_create_twice_reuses_blobs(registry: Registry, smollm2_path: Path) -> None:
    registry.create("a", from_=smollm2_path)
    before = blob_names(registry)
    registry.create("a", from_=str(smollm2_path))
    assert blob_names(registry) == before


def test_create_rejects_bad_input_without_leaving_anything(registry: Registry, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(InvalidModelFile):
        registry.create("junk", from_=junk)
    with pytest.raises(ModelNotFound, match="no such file"):
        registry.create("x", modelfile="FROM ./does-not-exist.gguf")
    with pytest.raises(ModelNotFound, match="pull it first"):
        registry.create("x", modelfile="FROM llama3")
    with pytest.raises(ModelfileError, match="nothing to create from"):
        registry.create("x", modelfile="SYSTEM hi")
    with pytest.raises(InvalidModelName):
        registry.create("bad name", from_=junk)
    with pytest.raises(InvalidModelFile, match="folder"):
        registry.create("x", from_=tmp_path)
    assert registry.list() == []
    assert not registry.store.blobs_dir.exists() or blob_names(registry) == set()


def test_modelfile_path_resolves_from_relative_to_its_folder(
    registry: Registry, smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "recipe"
    folder.mkdir()
    try:
        os.link(smollm2_path, folder / "model.gguf")
    except OSError:
        shutil.copy(smollm2_path, folder / "model.gguf")
    (folder / "Modelfile").write_text("FROM ./model.gguf\nSYSTEM from a file\n")
    monkeypatch.chdir(tmp_path)  # not the Modelfile's folder
    registry.create("viafile", modelfile=folder / "Modelfile")
    assert registry.resolve("viafile").system == "from a file"
    registry.create("viastr", modelfile=str(folder / "Modelfile"))
    assert registry.resolve("viastr").model_path == registry.resolve("viafile").model_path


def test_from_argument_overrides_the_modelfile(registry: Registry, smollm2_path: Path) -> None:
    registry.create("m", from_=smollm2_path, modelfile="FROM ./elsewhere.gguf\nPARAMETER top_k 3\n")
    assert registry.resolve("m").params == {"top_k": 3}


# ---------------------------------------------------------------- layering on an existing model


def test_layering_on_an_existing_model(shared: Registry) -> None:
    base = shared.resolve("smollm2")
    pirate = shared.resolve("pirate")
    assert pirate.model_path == base.model_path
    assert pirate.template == CHATML
    assert pirate.system == "You are a pirate."
    assert pirate.params == {"temperature": 0.2, "stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 2048}
    assert pirate.messages == (
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Arr, a pirate."},
    )
    assert pirate.license == "Apache-2.0"
    _stored, manifest = shared.find("pirate")
    assert manifest.layer_of(MEDIA_MODEL).from_ == "smollm2:latest"  # type: ignore[union-attr]
    params_blob = shared.store.read_blob(manifest.layer_of(MEDIA_PARAMS).digest)  # type: ignore[union-attr]
    assert (
        params_blob
        == b'{"temperature":0.2,"stop":["\\u003c|im_end|\\u003e","\\u003c|endoftext|\\u003e"],"num_ctx":2048}\n'
    )


def test_layers_replace_and_params_merge(registry: Registry, smollm2_path: Path) -> None:
    registry.create("base", from_=smollm2_path)
    registry.create("one", modelfile="FROM base\nSYSTEM first\nTEMPLATE {{ .Prompt }}\nPARAMETER temperature 0.3\n")
    events: list[dict[str, Any]] = []
    registry.create("two", modelfile="FROM one\nSYSTEM second\nPARAMETER top_k 5\n", progress=events.append)
    two = registry.resolve("two")
    assert two.system == "second"
    assert two.template == "{{ .Prompt }}"
    assert two.params == {"temperature": 0.3, "top_k": 5}
    _, manifest = registry.find("two")
    assert len(manifest.layers_of(MEDIA_SYSTEM)) == 1
    assert len(manifest.layers_of(MEDIA_PARAMS)) == 1
    assert len(manifest.layers_of(MEDIA_TEMPLATE)) == 1
    statuses = [e["status"] for e in events]
    assert statuses[0] == "parsing modelfile"
    assert any(s.startswith("using existing layer sha256:") for s in statuses)
    assert any(s.startswith("creating new layer sha256:") for s in statuses)
    assert statuses[-1] == "success"
    # re-creating a model on top of itself works and frees the replaced layers
    registry.create("two", modelfile="FROM two\nSYSTEM third\n")
    assert registry.resolve("two").system == "third"
    second = registry.store.blob_path("sha256:" + hashlib.sha256(b"second").hexdigest())
    assert not second.exists()


# ---------------------------------------------------------------- resolve


def test_resolve_is_case_insensitive(shared: Registry) -> None:
    assert shared.resolve("PIRATE:LATEST").name == "pirate:latest"
    assert shared.resolve("registry.ollama.ai/library/Pirate").name == "pirate:latest"


def test_resolve_a_path(registry: Registry, smollm2_path: Path) -> None:
    resolved = registry.resolve(str(smollm2_path))
    assert resolved.model_path == smollm2_path.resolve()
    assert resolved.name == str(smollm2_path.resolve())
    assert resolved.digest is None and resolved.params == {}
    assert registry.resolve(smollm2_path).model_path == smollm2_path.resolve()


def test_resolve_a_bad_file(registry: Registry, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(InvalidModelFile):
        registry.resolve(str(junk))


def test_model_not_found_is_helpful(registry: Registry) -> None:
    with pytest.raises(ModelNotFound) as info:
        registry.resolve("nothere")
    assert "pull it" in str(info.value) and "create it" in str(info.value)
    with pytest.raises(ModelNotFound, match="no such model file"):
        registry.resolve("./missing.gguf")
    with pytest.raises(InvalidModelName):
        registry.resolve("bad name!")
    with pytest.raises(ModelNotFound):
        registry.show("nothere")
    with pytest.raises(ModelNotFound):
        registry.delete("nothere")
    with pytest.raises(ModelNotFound):
        registry.copy("nothere", "other")


def test_missing_blob_is_reported(registry: Registry, smollm2_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copy(smollm2_path, copy)
    registry.create("m", from_=copy, modelfile=None)
    registry.resolve("m").model_path.unlink()
    with pytest.raises(InvalidModelFile, match="missing"):
        registry.resolve("m")


# ---------------------------------------------------------------- list / show


def test_list(shared: Registry, smollm2_path: Path) -> None:
    entries = shared.list()
    assert [e.name for e in entries] == ["pirate:latest", "smollm2:latest"]  # newest first
    pirate, base = entries
    assert base["model"] == "smollm2:latest"
    assert base.size > smollm2_path.stat().st_size
    assert len(base.digest) == 64
    assert base.details.format == "gguf"
    assert base.details.family == "llama"
    assert base.details.families == ("llama",)
    assert base.details.parameter_size == "134.52M"
    assert base.details.quantization_level == "Q4_1"
    assert base.details.parent_model == ""
    assert pirate.details["parent_model"] == "smollm2:latest"
    assert base.modified_at.tzinfo is not None  # a moment, not a wall-clock reading


def test_show(shared: Registry) -> None:
    shown = shared.show("pirate")
    assert shown.system == "You are a pirate."
    assert shown.template == CHATML
    assert shown.license == "Apache-2.0"
    assert shown.messages == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Arr, a pirate."},
    ]
    assert shown.parameters == (
        "temperature                    0.2\n"
        'stop                           "<|im_end|>"\n'
        'stop                           "<|endoftext|>"\n'
        "num_ctx                        2048"
    )
    assert shown.details.context_length == 8192
    assert shown.details.embedding_length == 576
    assert shown.details.family == "llama"
    assert shown.details.parent_model == "smollm2:latest"
    assert shown.model_info["general.architecture"] == "llama"
    assert "tokenizer.chat_template" not in shown.model_info
    assert shown.capabilities == ["completion"]
    assert shown["modified_at"]
    lines = shown.modelfile.splitlines()
    assert lines[0] == '# Modelfile generated by "localllm show"'
    assert "# FROM pirate:latest" in lines
    resolved = shared.resolve("pirate")
    assert f"FROM {resolved.model_path}" in lines
    assert "PARAMETER stop <|im_end|>" in lines
    assert "SYSTEM You are a pirate." in lines


def test_show_modelfile_recreates_the_model(shared: Registry, tmp_path: Path) -> None:
    text = shared.show("pirate").modelfile
    assert parse_modelfile(text).system == "You are a pirate."
    other = Registry(shared.models_dir)
    other.create("pirate-again", modelfile=text)
    try:
        a, b = shared.resolve("pirate"), shared.resolve("pirate-again")
        assert (a.model_path, a.template, a.system, a.params, a.messages, a.license) == (
            b.model_path,
            b.template,
            b.system,
            b.params,
            b.messages,
            b.license,
        )
    finally:
        shared.delete("pirate-again")


def test_show_base_model_uses_the_gguf_template(shared: Registry, smollm2_path: Path) -> None:
    shown = shared.show("smollm2", verbose=True)
    assert "<|im_start|>" in shown.template  # the GGUF's own chat template
    assert "TEMPLATE" not in shown.modelfile  # only a TEMPLATE layer is written back
    assert shown.parameters == ""
    assert isinstance(shown.model_info["tokenizer.ggml.tokens"], list)
    by_path = shared.show(str(smollm2_path))
    assert by_path.details.family == "llama" and by_path.details.quantization_level == "Q4_1"
    assert f"FROM {smollm2_path.resolve()}" in by_path.modelfile


def _info(**kw: Any) -> Any:
    defaults: dict[str, Any] = {"architecture": "llama", "pooling_type": None, "metadata": {}}
    return SimpleNamespace(**{**defaults, **kw})


def test_capabilities() -> None:
    assert model_capabilities(_info(), None) == ("completion",)
    assert model_capabilities(_info(pooling_type=1), "{{ .Tools }}") == ("embedding",)
    assert model_capabilities(_info(architecture="bert"), None) == ("embedding",)
    assert model_capabilities(_info(), "{{ if .Tools }}{{ end }}") == ("completion", "tools")
    assert model_capabilities(_info(), "{% if tools %}{% endif %}") == ("completion", "tools")
    assert model_capabilities(_info(), "<think>{{ .Thinking }}</think>") == ("completion", "thinking")
    assert model_capabilities(_info(), "{% if enable_thinking %}{% endif %}") == ("completion", "thinking")
    assert model_capabilities(_info(), "{{ .Prompt }}{{ .Suffix }}") == ("completion", "insert")
    fim = {"tokenizer.ggml.fim_pre_token_id": 1, "tokenizer.ggml.fim_suf_token_id": 2}
    assert model_capabilities(_info(metadata=fim), None) == ("completion", "insert")
    assert model_capabilities(_info(), None, Path("/p")) == ("completion", "vision")


def test_format_parameters_like_ollama() -> None:
    text = format_parameters({"stop": ["a\nb", '"q"'], "temperature": 1.0, "use_mmap": False, "top_p": 0.95})
    assert text.splitlines() == [
        f'{"stop":<30} "a\\nb"',
        f'{"stop":<30} "\\"q\\""',
        f"{'temperature':<30} 1",
        f"{'use_mmap':<30} false",
        f"{'top_p':<30} 0.95",
    ]


# ---------------------------------------------------------------- copy / delete / prune


def test_copy_delete_and_blob_lifetimes(registry: Registry, smollm2_path: Path) -> None:
    registry.create("base", from_=smollm2_path)
    registry.create("derived", modelfile="FROM base\nSYSTEM derived system\nPARAMETER top_k 9\n")
    registry.copy("derived", "Copy:v1")
    assert registry.resolve("copy:V1").system == "derived system"
    assert registry.resolve("copy:v1").name == "Copy:v1"
    registry.copy("derived", "derived")  # same model: nothing happens
    model_blob = registry.resolve("base").model_path
    system_blob = registry.store.blob_path("sha256:" + hashlib.sha256(b"derived system").hexdigest())

    registry.delete("derived")  # the copy still uses every blob
    assert system_blob.exists() and model_blob.exists()
    with pytest.raises(ModelNotFound):
        registry.resolve("derived")

    registry.delete("COPY:V1")  # now the system and params blobs are unused; the model blob is not
    assert not system_blob.exists()
    assert model_blob.exists()
    assert [e.name for e in registry.list()] == ["base:latest"]

    registry.delete("base")
    assert blob_names(registry) == set()
    assert registry.list() == []
    assert not (registry.models_dir / "manifests" / "registry.ollama.ai").exists()


def test_copy_over_an_existing_model_frees_its_blobs(registry: Registry, smollm2_path: Path) -> None:
    registry.create("base", from_=smollm2_path)
    registry.create("a", modelfile="FROM base\nSYSTEM only in a\n")
    registry.create("b", modelfile="FROM base\nSYSTEM only in b\n")
    registry.copy("a", "b")
    assert registry.resolve("b").system == "only in a"
    assert not registry.store.blob_path("sha256:" + hashlib.sha256(b"only in b").hexdigest()).exists()


def test_prune(registry: Registry, smollm2_path: Path) -> None:
    registry.create("base", from_=smollm2_path)
    orphan = registry.store.add_bytes(b"orphan")
    partial = registry.store.partial_path("sha256:" + "0" * 64)
    partial.write_bytes(b"half")
    removed = registry.prune()
    assert sorted(removed) == sorted([orphan.replace(":", "-"), partial.name])
    assert registry.resolve("base").model_path.exists()


# ---------------------------------------------------------------- an Ollama store, as Ollama writes it


def _ollama_store(root: Path, smollm2_path: Path) -> dict[str, str]:
    blobs = root / "blobs"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest.replace(":", "-")).write_bytes(data)
        return digest, len(data)

    model_digest = "sha256:" + hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    try:
        os.link(smollm2_path, blobs / model_digest.replace(":", "-"))
    except OSError:
        shutil.copy(smollm2_path, blobs / model_digest.replace(":", "-"))
    params = put(b'{"stop":["<|im_end|>"],"temperature":0.7}')
    template = put(CHATML.encode())
    system = put(b"You are SmolLM, a helpful assistant.")
    config = put(
        b'{"model_format":"gguf","model_family":"llama","model_families":["llama"],"model_type":"134.52M",'
        b'"file_type":"Q4_1","architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": MEDIA_CONFIG, "digest": config[0], "size": config[1]},
        "layers": [
            {"mediaType": MEDIA_MODEL, "digest": model_digest, "size": smollm2_path.stat().st_size},
            {"mediaType": MEDIA_TEMPLATE, "digest": template[0], "size": template[1]},
            {"mediaType": MEDIA_SYSTEM, "digest": system[0], "size": system[1]},
            {"mediaType": MEDIA_PARAMS, "digest": params[0], "size": params[1]},
        ],
    }
    path = root / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest, indent=2))  # a pulled manifest keeps the registry's formatting
    return {"model": model_digest, "params": params[0], "system": system[0], "template": template[0]}


def test_an_ollama_store_is_used_as_is(tmp_path: Path, smollm2_path: Path) -> None:
    root = tmp_path / "ollama" / "models"
    digests = _ollama_store(root, smollm2_path)
    manifest_bytes = (root / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m").read_bytes()
    registry = Registry(root)

    resolved = registry.resolve("SmolLM2:135M")
    assert resolved.name == "smollm2:135m"
    assert resolved.model_path == root / "blobs" / digests["model"].replace(":", "-")
    assert resolved.params == {"stop": ["<|im_end|>"], "temperature": 0.7}
    assert resolved.template == CHATML
    assert resolved.system == "You are SmolLM, a helpful assistant."

    [entry] = registry.list()
    assert entry.name == "smollm2:135m"
    assert entry.digest == hashlib.sha256(manifest_bytes).hexdigest()
    assert entry.details.quantization_level == "Q4_1"
    shown = registry.show("smollm2:135m")
    assert 'stop                           "<|im_end|>"' in shown.parameters
    assert shown.capabilities == ["completion"]

    # build on it, then remove what we built: Ollama's own files are untouched
    registry.create("mine", modelfile="FROM smollm2:135m\nSYSTEM mine\n")
    mine = registry.resolve("mine")
    assert mine.params == resolved.params and mine.template == CHATML and mine.system == "mine"
    registry.copy("smollm2:135m", "alias")
    registry.delete("mine")
    registry.delete("alias")
    assert (root / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m").read_bytes() == manifest_bytes
    for digest in digests.values():
        assert registry.store.has_blob(digest)
    assert registry.prune() == []


def test_modelfile_build_parameters_are_typed(shared: Registry) -> None:
    mf = Modelfile.build(from_="x", parameters=shared.resolve("pirate").params)
    assert parse_modelfile(mf.format()).parameters == shared.resolve("pirate").params


def test_params_layer_json_is_go_style() -> None:
    assert go_json({"a": "<&>"}) == b'{"a":"\\u003c\\u0026\\u003e"}\n'
