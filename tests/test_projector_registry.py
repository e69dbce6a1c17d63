"""Vision models in the registry: every way Ollama gives a model its projector, the pairing checks, and the
projector's share of the memory plan. Real files: SmolLM2 and the test projector libmtmd loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from projector import write_test_projector
from servers import HFHub, sha256_digest
from test_gguf_validate import write_projector
from test_pull import use_hub

from localllm import Engine
from localllm.errors import InvalidModelFile, ModelfileError
from localllm.registry import BlobStore, Layer, Manifest, ModelName, Registry
from localllm.registry.pull import PullSettings, pull
from localllm.registry.store import MEDIA_CONFIG, MEDIA_MODEL, MEDIA_PROJECTOR
from localllm.runner.protocol import LoadConfig
from localllm.scheduler.devices import DeviceInventory, GpuDevice, SystemMemory
from localllm.scheduler.loader import RunnerFactory
from localllm.scheduler.memory import plan_layers
from localllm.settings import EngineSettings

GiB = 1024**3


def assert_vision(registry: Registry, name: str, projector: Path) -> None:
    """The model runs with the projector, and show says so as Ollama's does."""
    resolved = registry.resolve(name)
    assert resolved.projector is not None
    assert resolved.projector.read_bytes() == projector.read_bytes()
    shown = registry.show(name, verbose=True)
    assert "vision" in shown.capabilities and "completion" in shown.capabilities
    assert "audio" not in shown.capabilities
    assert shown.projector_info is not None
    assert shown.projector_info["general.architecture"] == "clip"
    assert shown.projector_info["clip.vision.image_size"] == 32
    listed = {m.name: m for m in registry.list()}
    assert "vision" in listed[ModelName.parse(name).display].capabilities


def store_model(store: BlobStore, name: str, files: list[tuple[str, Path]]) -> None:
    """A model written the way Ollama writes one: a blob per layer and a manifest."""
    layers = [Layer(media_type=media, digest=store.add_file(path), size=path.stat().st_size) for media, path in files]
    config = b'{"model_format":"gguf","model_family":"llama"}'
    store.write_manifest(
        ModelName.parse(name),
        Manifest(
            config=Layer(media_type=MEDIA_CONFIG, digest=store.add_bytes(config), size=len(config)),
            layers=tuple(layers),
        ),
    )


# ------------------------------------------------------------------------------------------------ the routes


async def test_uploaded_files_are_told_apart_by_their_metadata_not_their_names(
    smollm2_path: Path, projector_path: Path, home: Path
) -> None:
    """Ollama's /api/create `files`: the projector is found by what it is, in whatever order and name it comes."""
    async with Engine(home) as engine:
        model_digest = await engine.create_blob(smollm2_path)
        projector_digest = await engine.create_blob(projector_path)
        # The projector listed first, under the name a model file would have.
        await engine.create("vis", files={"model.gguf": projector_digest, "weights.gguf": model_digest})
        shown = await engine.show("vis")
        assert "vision" in shown.capabilities
        assert shown.projector_info is not None and shown.projector_info["general.type"] == "mmproj"
    registry = Registry(home / "models")
    _, manifest = registry.find("vis")
    assert [(layer.media_type, layer.digest) for layer in manifest.layers] == [
        (MEDIA_MODEL, model_digest),
        (MEDIA_PROJECTOR, projector_digest),
    ]
    assert_vision(registry, "vis", projector_path)


def test_a_modelfile_with_a_second_from_line_adds_the_projector(
    smollm2_path: Path, projector_path: Path, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "models")
    registry.create("vis", modelfile=f"FROM {smollm2_path}\nFROM {projector_path}\n")
    assert_vision(registry, "vis", projector_path)
    # Built on: the base's projector is kept.
    registry.create("vis2", modelfile="FROM vis\nSYSTEM You describe pictures.\n")
    assert_vision(registry, "vis2", projector_path)
    assert "FROM " + str(registry.resolve("vis2").projector) in registry.show("vis2").modelfile


def test_a_model_in_the_ollama_layout_with_a_projector_layer(
    smollm2_path: Path, projector_path: Path, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "models")
    store_model(store, "library/seeing:latest", [(MEDIA_MODEL, smollm2_path), (MEDIA_PROJECTOR, projector_path)])
    assert_vision(Registry(store.root), "seeing", projector_path)


def test_a_hugging_face_pull_fetches_the_repositorys_projector(
    smollm2_path: Path, projector_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As Ollama's pull of a GGUF repository with an mmproj file: the model file chosen, the projector beside it."""
    files = {
        "README.md": b"# a vision model\n",
        "model-Q4_1.gguf": smollm2_path.read_bytes(),
        "mmproj-model-f16.gguf": projector_path.read_bytes(),
    }
    store = BlobStore(tmp_path / "models")
    with HFHub() as hub:
        use_hub(monkeypatch, hub)
        hub.add_repo("owner/Vision-GGUF", files)
        pull(store, "hf.co/owner/Vision-GGUF", settings=PullSettings(stall_timeout=5.0, backoff=0.01))
    manifest = store.read_manifest(ModelName.parse("hf.co/owner/Vision-GGUF:latest"))
    assert [(layer.media_type, layer.digest) for layer in manifest.layers] == [
        (MEDIA_MODEL, sha256_digest(files["model-Q4_1.gguf"])),
        (MEDIA_PROJECTOR, sha256_digest(files["mmproj-model-f16.gguf"])),
    ]
    config = json.loads(store.read_blob(manifest.config.digest))
    assert config["rootfs"]["diff_ids"] == [layer.digest for layer in manifest.layers]
    assert_vision(Registry(store.root), "hf.co/owner/Vision-GGUF", projector_path)


def test_an_audio_encoder_adds_the_audio_capability(smollm2_path: Path, tmp_path: Path) -> None:
    audio = {
        "clip__has_audio_encoder": ("bool", True),
        **{f"clip__audio__{k}": ("u32", 64) for k in ("embedding_length", "feed_forward_length", "projection_dim")},
        "clip__audio__block_count": ("u32", 2),
        "clip__audio__attention__head_count": ("u32", 4),
        "clip__audio__attention__layer_norm_epsilon": ("f32", 1e-5),
        "clip__audio__num_mel_bins": ("u32", 128),
    }
    both = write_projector(tmp_path, **audio)
    only_audio = write_projector(tmp_path, clip__has_vision_encoder=("bool", False), **audio)
    registry = Registry(tmp_path / "models")
    registry.create("both", modelfile=f"FROM {smollm2_path}\nFROM {both}\n")
    registry.create("hearing", modelfile=f"FROM {smollm2_path}\nFROM {only_audio}\n")
    assert {"vision", "audio"} <= set(registry.show("both").capabilities)
    hearing = registry.show("hearing").capabilities
    assert "audio" in hearing and "vision" not in hearing


# ------------------------------------------------------------------------------------------------ refusals


def test_two_projectors_or_a_projector_as_the_model_are_refused(
    smollm2_path: Path, projector_path: Path, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "models")
    second = write_test_projector(tmp_path / "other-mmproj.gguf", seed=1)
    with pytest.raises(InvalidModelFile, match="a second projector; a model has one projector"):
        registry.create("two", modelfile=f"FROM {smollm2_path}\nFROM {projector_path}\nFROM {second}\n")
    with pytest.raises(InvalidModelFile, match="is a projector GGUF, not a model"):
        registry.create("alone", modelfile=f"FROM {projector_path}\n")
    with pytest.raises(InvalidModelFile, match="is a projector GGUF, not a model"):
        registry.resolve(str(projector_path))
    with pytest.raises(ModelfileError, match="a second model"):
        registry.create("twice", modelfile=f"FROM {smollm2_path}\nFROM {smollm2_path}\n")
    assert registry.list() == []

    store = BlobStore(tmp_path / "ollama")
    layers = [(MEDIA_MODEL, smollm2_path), (MEDIA_PROJECTOR, projector_path), (MEDIA_PROJECTOR, second)]
    store_model(store, "library/double:latest", layers)
    store_model(store, "library/backwards:latest", [(MEDIA_MODEL, projector_path)])
    other = Registry(store.root)
    with pytest.raises(InvalidModelFile, match="model 'double:latest' has two projector layers"):
        other.resolve("double")
    with pytest.raises(InvalidModelFile, match="'backwards:latest' is a projector GGUF, not a model"):
        other.resolve("backwards")


def test_a_projector_made_for_another_width_is_refused_naming_both(smollm2_path: Path, tmp_path: Path) -> None:
    """libmtmd would refuse it only at load, with a log line; the registry says why when the pair is made."""
    narrow = write_test_projector(tmp_path / "mmproj-512.gguf", text_width=512)
    registry = Registry(tmp_path / "models")
    with pytest.raises(InvalidModelFile, match=r"output is 512 wide but .* embeddings are 576 wide \(llama\.emb"):
        registry.create("mismatched", modelfile=f"FROM {smollm2_path}\nFROM {narrow}\n")
    assert registry.list() == []
    store = BlobStore(tmp_path / "ollama")
    store_model(store, "library/mismatched:latest", [(MEDIA_MODEL, smollm2_path), (MEDIA_PROJECTOR, narrow)])
    with pytest.raises(InvalidModelFile, match=r"512 wide .* 576 wide"):
        Registry(store.root).resolve("mismatched")


# ------------------------------------------------------------------------------------------------ memory


def test_the_memory_plan_counts_the_projector_where_it_runs(
    smollm2_path: Path, projector_path: Path, tmp_path: Path
) -> None:
    roomy = DeviceInventory(
        gpus=(GpuDevice(index=0, name="Test GPU", total_memory=8 * GiB, free_memory=8 * GiB),),
        system=SystemMemory(total=64 * GiB, free=32 * GiB),
    )
    settings = EngineSettings.resolve(str(tmp_path), None, None, None, None, None, None, environ={})
    factory = RunnerFactory(settings, devices=roomy)
    text = LoadConfig(model_path=str(smollm2_path), num_ctx=2048)
    vision = LoadConfig(model_path=str(smollm2_path), num_ctx=2048, projector_path=str(projector_path))
    size = projector_path.stat().st_size
    without, with_projector = factory.estimate(text), factory.estimate(vision)
    assert with_projector.projector_bytes >= size and without.projector_bytes == 0
    assert with_projector.total_bytes - without.total_bytes >= size

    # Offloaded: on the GPU with the layers; on the CPU otherwise.
    on_gpu, text_on_gpu = factory.plan(vision), factory.plan(text)
    assert on_gpu.fits_fully
    assert on_gpu.bytes_per_device[0] - text_on_gpu.bytes_per_device[0] == with_projector.projector_bytes
    assert on_gpu.cpu_bytes == text_on_gpu.cpu_bytes
    on_cpu = plan_layers(with_projector, roomy, num_gpu=0)
    text_on_cpu = plan_layers(without, roomy, num_gpu=0)
    assert on_cpu.cpu_bytes - text_on_cpu.cpu_bytes == with_projector.projector_bytes
    assert factory.size(vision)[0] - factory.size(text)[0] == with_projector.projector_bytes
