"""No GGUF file reaches llama.cpp unvalidated: pulls (OCI registry, Hugging Face), create (FROM, ADAPTER), and
models resolved from the store, including one another tool wrote or changed. Each version of a file is validated
once.

llama.cpp aborts the whole process on some malformed files, so the model uses below run in this process: if a
file got through, pytest itself would die.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from projector import write_test_projector
from servers import HFHub, OCIRegistry, sha256_digest, tiny_gguf

import localllm.gguf.validate as validate_module
from localllm import Engine
from localllm.errors import InvalidModelFile, ModelNotFound
from localllm.registry import BlobStore, Layer, Manifest, ModelName, Registry
from localllm.registry.pull import PullSettings, pull
from localllm.registry.store import GGUF_MEDIA_TYPES, MEDIA_ADAPTER, MEDIA_CONFIG, MEDIA_MODEL, MEDIA_PROJECTOR

FAST = PullSettings(part_size=16 * 1024, connections=4, stall_timeout=2.0, connect_timeout=2.0, max_retries=1)
# A vocabulary with one token twice: llama.cpp fails GGML_ASSERT(id_to_token.size() == token_to_id.size()).
REPEATED_TOKEN = [f"t{i}" for i in range(31)] + ["t7"]


def duplicate_a_token(source: Path, target: Path) -> tuple[int, int]:
    """Copy a GGUF file with one token overwritten by an earlier token of the same length (the size stays)."""
    data = bytearray(source.read_bytes())
    key = b"tokenizer.ggml.tokens"
    pos = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    value_type, element_type, count = struct.unpack_from("<IIQ", data, pos)
    assert (value_type, element_type) == (9, 8)  # an array of strings
    pos += 16
    earlier: dict[int, tuple[int, int]] = {}  # length -> (id, offset) of the first ordinary token that long
    for index in range(count):
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if index >= 1000 and length >= 4:  # well past the special tokens
            if length in earlier:
                first, first_pos = earlier[length]
                data[pos : pos + length] = data[first_pos : first_pos + length]
                target.write_bytes(data)
                return first, index
            earlier[length] = (index, pos)
        pos += length
    raise AssertionError("no two tokens of the same length")


@pytest.fixture(scope="module")
def smollm2_repeating(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """SmolLM2 with one token twice, and what the validator says about it."""
    path = tmp_path_factory.mktemp("bad") / "smollm2-repeated-token.gguf"
    first, second = duplicate_a_token(smollm2_path, path)
    return path, f"twice (ids {first} and {second})"


def write_adapter(path: Path, *, alpha: float | str = 4.0) -> Path:
    """A LoRA adapter for the tiny llama model; a string alpha trips an assert in llama.cpp's adapter loader."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string("adapter.type", "lora")
    if isinstance(alpha, str):
        writer.add_string("adapter.lora.alpha", alpha)
    else:
        writer.add_float32("adapter.lora.alpha", alpha)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 16), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((16, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def projector_gguf(tmp_path: Path) -> bytes:
    """A sound projector whose output is as wide as `tiny_gguf`'s embeddings (16)."""
    return write_test_projector(tmp_path / "projector.gguf", text_width=16).read_bytes()


def settled(path: Path) -> Path:
    """Date the file an hour back: a verdict on a file modified moments ago is not remembered."""
    past = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(past, past))
    return path


def store_model(store: BlobStore, name: str, files: dict[str, bytes]) -> Manifest:
    """Write a model the way another tool sharing the store (Ollama) would: blobs and a manifest, no checks."""
    layers = [Layer(media_type=media, digest=store.add_bytes(data), size=len(data)) for media, data in files.items()]
    config = b'{"model_format":"gguf"}'
    manifest = Manifest(
        config=Layer(media_type=MEDIA_CONFIG, digest=store.add_bytes(config), size=len(config)), layers=tuple(layers)
    )
    store.write_manifest(ModelName.parse(name), manifest)
    return manifest


def layer_path(store: BlobStore, manifest: Manifest) -> Path:
    layer = manifest.layer_of(MEDIA_MODEL)
    assert layer is not None
    return store.blob_path(layer.digest)


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the validator reads, in order."""
    seen: list[Path] = []
    real = validate_module.validate_file

    def counting(path: str | os.PathLike[str]) -> None:
        seen.append(Path(path))
        real(path)

    monkeypatch.setattr(validate_module, "validate_file", counting)
    return seen


@pytest.fixture
def registry_server() -> Iterator[OCIRegistry]:
    server = OCIRegistry()
    with server:
        yield server


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HFHub]:
    server = HFHub()
    with server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        yield server


# ---------------------------------------------------------------------------------------------------------------
# Pulls


async def test_oci_pull_of_smollm2_with_a_repeated_token_is_refused(
    home: Path, registry_server: OCIRegistry, smollm2_repeating: tuple[Path, str]
) -> None:
    path, reason = smollm2_repeating
    manifest = registry_server.add_model("library/smollm2", "broken", path.read_bytes())
    name = f"{registry_server.host}/library/smollm2:broken"
    async with Engine(home) as engine:
        with pytest.raises(InvalidModelFile, match="nothing was saved") as caught:
            await engine.pull(name)
        assert reason in str(caught.value)
        with pytest.raises(ModelNotFound):  # no manifest names the bad blob: the first use finds nothing
            await engine.generate(name, "Hello", options={"num_predict": 1})
        assert (await engine.list()).models == []
    assert not BlobStore(home / "models").has_blob(manifest["layers"][0]["digest"])  # downloaded, then removed


def test_oci_pull_checks_adapters_and_projectors_too(registry_server: OCIRegistry, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "models")
    bad_adapter = write_adapter(tmp_path / "adapter.gguf", alpha="4").read_bytes()
    registry_server.add_model("library/tiny", "lora", tiny_gguf(), extra=[(MEDIA_ADAPTER, bad_adapter)])
    with pytest.raises(InvalidModelFile, match=r"its LoRA adapter .* 'adapter\.lora\.alpha' must be a float32"):
        pull(store, f"{registry_server.host}/library/tiny:lora", settings=FAST)
    truncated_projector = projector_gguf(tmp_path)[:-1]
    registry_server.add_model("library/tiny", "vision", tiny_gguf(), extra=[(MEDIA_PROJECTOR, truncated_projector)])
    with pytest.raises(InvalidModelFile, match=r"its projector .* runs past the end of the file"):
        pull(store, f"{registry_server.host}/library/tiny:vision", settings=FAST)
    assert store.list_manifests() == []


def test_hf_pull_of_a_repeated_token_is_refused(hub: HFHub, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "models")
    broken = tiny_gguf(tokens=REPEATED_TOKEN)
    hub.add_repo("owner/Broken-GGUF", {"broken-Q4_K_M.gguf": broken})
    with pytest.raises(InvalidModelFile, match=r"token 't7' twice \(ids 7 and 31\)"):
        pull(store, "hf.co/owner/Broken-GGUF", settings=FAST)
    assert store.list_manifests() == []
    assert not store.has_blob(sha256_digest(broken))


# ---------------------------------------------------------------------------------------------------------------
# Create


def test_create_refuses_a_bad_lora_adapter(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    (tmp_path / "tiny.gguf").write_bytes(tiny_gguf())
    write_adapter(tmp_path / "bad-alpha.gguf", alpha="4")  # llama.cpp asserts alpha is a float32
    write_adapter(tmp_path / "good.gguf")

    def create(adapter: str) -> None:
        (tmp_path / "Modelfile").write_text(f"FROM ./tiny.gguf\nADAPTER {adapter}\n")
        registry.create("tiny", modelfile=tmp_path / "Modelfile")

    with pytest.raises(InvalidModelFile, match=r"ADAPTER \./bad-alpha\.gguf: .*'adapter\.lora\.alpha' must be a"):
        create("./bad-alpha.gguf")
    with pytest.raises(InvalidModelFile, match=r"ADAPTER \./tiny\.gguf: .* is a model GGUF, not a LoRA adapter"):
        create("./tiny.gguf")
    assert registry.list() == []
    create("./good.gguf")
    assert len(registry.resolve("tiny").adapters) == 1


def test_create_refuses_a_bad_gguf_and_a_bad_base_model(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf(tokens=REPEATED_TOKEN))
    with pytest.raises(InvalidModelFile, match=r"broken.gguf: the vocabulary has the token 't7' twice"):
        registry.create("broken", from_=broken)
    store_model(registry.store, "elsewhere", {MEDIA_MODEL: broken.read_bytes()})  # written by another tool
    with pytest.raises(InvalidModelFile, match="model 'elsewhere:latest' cannot be used: its model file"):
        registry.create("derived", modelfile="FROM elsewhere\nSYSTEM hi\n")
    assert [m.name for m in registry.list()] == ["elsewhere:latest"]


# ---------------------------------------------------------------------------------------------------------------
# Resolve: the store (also one another tool writes to) and paths


async def test_a_stored_model_whose_blob_was_replaced_is_refused(
    home: Path, smollm2_path: Path, smollm2_repeating: tuple[Path, str]
) -> None:
    path, reason = smollm2_repeating
    async with Engine(home) as engine:
        await engine.create("smollm2", from_=smollm2_path)
        _, manifest = engine.registry.find("smollm2")
        layer = manifest.layer_of(MEDIA_MODEL)
        assert layer is not None
        blob = engine.registry.store.blob_path(layer.digest)
        # Another tool writes a new file under the blob's name: bytes that no longer match the name are refused
        # before llama.cpp (or the validator) reads them.
        replacement = blob.with_name("replacement.tmp")
        shutil.copyfile(path, replacement)
        os.replace(replacement, blob)
        with pytest.raises(InvalidModelFile, match="model 'smollm2:latest' cannot be used: its model file") as caught:
            await engine.generate("smollm2", "Hello", options={"num_predict": 1})
        assert "is damaged" in str(caught.value) and "Pull or create the model again" in str(caught.value)
        assert reason not in str(caught.value)
        assert (await engine.ps()).models == []
        await engine.delete("smollm2")  # what the message advises works
        assert (await engine.list()).models == []


@pytest.mark.parametrize("bad_media", [MEDIA_MODEL, MEDIA_ADAPTER, MEDIA_PROJECTOR])
def test_a_store_written_by_another_tool_is_checked_at_resolve(tmp_path: Path, bad_media: str) -> None:
    good = {
        MEDIA_MODEL: tiny_gguf(),
        MEDIA_ADAPTER: write_adapter(tmp_path / "adapter.gguf").read_bytes(),
        MEDIA_PROJECTOR: projector_gguf(tmp_path),
    }
    bad = {
        MEDIA_MODEL: tiny_gguf(tokens=REPEATED_TOKEN),
        MEDIA_ADAPTER: write_adapter(tmp_path / "bad-adapter.gguf", alpha="4").read_bytes(),
        MEDIA_PROJECTOR: good[MEDIA_PROJECTOR][:-1],
    }
    store = BlobStore(tmp_path / "models")
    store_model(store, "good", good)
    store_model(store, "bad", {**good, bad_media: bad[bad_media]})
    registry = Registry(store.root)
    resolved = registry.resolve("good")
    assert len(resolved.adapters) == 1 and resolved.projector is not None
    with pytest.raises(InvalidModelFile, match=f"model 'bad:latest' cannot be used: its {GGUF_MEDIA_TYPES[bad_media]}"):
        registry.resolve("bad")


def test_a_gguf_path_is_checked_at_resolve(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf(tokens=REPEATED_TOKEN))
    for model in (str(broken), broken):
        with pytest.raises(InvalidModelFile, match="token 't7' twice"):
            registry.resolve(model)


# ---------------------------------------------------------------------------------------------------------------
# The verdict cache


def test_each_version_of_a_file_is_validated_once(tmp_path: Path, validations: list[Path]) -> None:
    store = BlobStore(tmp_path / "models")
    manifest = store_model(store, "tiny", {MEDIA_MODEL: tiny_gguf(seed=3)})
    layer = manifest.layer_of(MEDIA_MODEL)
    assert layer is not None
    blob = settled(store.blob_path(layer.digest))
    registry = Registry(store.root)
    for _ in range(3):
        registry.resolve("tiny")
    assert validations == [blob]

    # A new version of the blob (another tool wrote it again): read again.
    replacement = tmp_path / "replacement.gguf"
    replacement.write_bytes(blob.read_bytes())
    os.replace(settled(replacement), blob)
    registry.resolve("tiny")
    registry.resolve("tiny")
    assert validations == [blob, blob]

    # A refusal is remembered too.
    bad = layer_path(store, store_model(store, "bad", {MEDIA_MODEL: tiny_gguf(tokens=REPEATED_TOKEN)}))
    settled(bad)
    for _ in range(2):
        with pytest.raises(InvalidModelFile, match="token 't7' twice"):
            registry.resolve("bad")
    assert validations == [blob, blob, bad]

    # A GGUF file given by path, likewise.
    direct = tmp_path / "direct.gguf"
    direct.write_bytes(tiny_gguf(seed=4))
    settled(direct)
    for _ in range(2):
        registry.resolve(str(direct))
    assert validations == [blob, blob, bad, direct]


def test_a_file_modified_moments_ago_is_read_again(tmp_path: Path, validations: list[Path]) -> None:
    """Its next modification could fall in the same tick of the filesystem's clock and leave no trace."""
    fresh = tmp_path / "fresh.gguf"
    fresh.write_bytes(tiny_gguf(seed=5))
    registry = Registry(tmp_path / "models")
    registry.resolve(str(fresh))
    registry.resolve(str(fresh))
    assert validations == [fresh, fresh]
