"""No data loss in the store: blobs are copies that are checked against their names, pulls and deletes do not split
one another, damaged manifests do not lock a model in, and a template that does not parse is refused at create.

The servers are the loopback ones of `servers`, speaking the real OCI and Hugging Face protocols.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from servers import HFHub, OCIRegistry, localllm_shim, sha256_digest, tiny_gguf

import localllm.gguf.validate as validate_module
from localllm import Engine
from localllm.errors import InvalidModelFile, ModelNotFound, TemplateError
from localllm.registry import BlobStore, ModelName, Registry
from localllm.registry.pull import PullSettings, pull
from localllm.registry.store import MEDIA_MODEL, MEDIA_TEMPLATE

FAST = PullSettings(part_size=16 * 1024, connections=2, stall_timeout=2.0, connect_timeout=2.0, max_retries=1)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    return sha(path.read_bytes())


def settled(path: Path) -> Path:
    """Date the file an hour back, as a file nobody is writing any more."""
    past = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(past, past))
    return path


def corrupt_in_place(path: Path, offset: int | None = None) -> None:
    """Flip bytes inside the file without changing its size or its inode (as an edit through a hard link would)."""
    size = path.stat().st_size
    at = size // 2 if offset is None else offset
    with open(path, "r+b") as file:
        file.seek(at)
        chunk = file.read(16)
        file.seek(at)
        file.write(bytes(b ^ 0xFF for b in chunk))
    assert path.stat().st_size == size


def model_blob(registry: Registry, name: str) -> Path:
    _, manifest = registry.find(name)
    layer = manifest.layer_of(MEDIA_MODEL)
    assert layer is not None
    return registry.store.blob_path(layer.digest)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


@pytest.fixture
def oci() -> Iterator[OCIRegistry]:
    with OCIRegistry() as server:
        yield server


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HFHub]:
    with HFHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        yield server


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per file the digest check reads."""
    reads: list[int] = []

    def counting(*args: Any) -> Any:
        reads.append(1)
        return hashlib.sha256(*args)

    monkeypatch.setattr(validate_module, "hashlib", SimpleNamespace(sha256=counting))
    return reads


# ---------------------------------------------------------------------------------------------------------------
# Blobs are copies, and bytes that no longer match their name are found and replaced


def test_editing_the_source_in_place_leaves_the_model_alone(
    registry: Registry, smollm2_path: Path, tmp_path: Path
) -> None:
    source = tmp_path / "SmolLM2.gguf"
    shutil.copyfile(smollm2_path, source)
    original = file_digest(source)
    registry.create("smollm2", from_=source)

    corrupt_in_place(source)  # the user edits their file

    blob = model_blob(registry, "smollm2")
    assert blob == registry.store.blob_path(original)
    assert file_digest(blob) == original
    assert registry.resolve("smollm2").model_path == blob
    # A create from the edited file makes another blob; the model made first keeps its bytes.
    registry.create("edited", from_=source)
    assert model_blob(registry, "edited") != blob
    assert file_digest(blob) == original


def test_a_blob_corrupted_in_place_is_refused_and_a_create_of_the_true_bytes_repairs_it(
    registry: Registry, smollm2_path: Path, tmp_path: Path
) -> None:
    source = tmp_path / "SmolLM2.gguf"
    shutil.copyfile(smollm2_path, source)
    settled(source)
    registry.create("smollm2", from_=source)
    blob = model_blob(registry, "smollm2")
    registry.resolve("smollm2")

    corrupt_in_place(blob)

    with pytest.raises(InvalidModelFile, match="model 'smollm2:latest' cannot be used: its model file") as caught:
        registry.resolve("smollm2")
    message = str(caught.value)
    assert "is damaged" in message and "Pull or create the model again" in message
    assert str(registry.models_dir) not in message

    # The same, unchanged source file: the blob is not trusted because the source was copied before.
    registry.create("smollm2", from_=source)
    assert file_digest(blob) == file_digest(smollm2_path)
    registry.resolve("smollm2")

    # Damaged again; a pristine copy elsewhere (the installed model file) repairs it as well.
    corrupt_in_place(blob, offset=1000)
    with pytest.raises(InvalidModelFile, match="is damaged"):
        registry.resolve("smollm2")
    registry.create("smollm2", from_=smollm2_path)
    assert file_digest(blob) == file_digest(smollm2_path)
    assert registry.resolve("smollm2").model_path == blob


async def test_generate_on_a_corrupted_blob_fails_before_loading(home: Path, smollm2_path: Path) -> None:
    async with Engine(home) as engine:
        await engine.create("smollm2", from_=smollm2_path)
        corrupt_in_place(model_blob(engine.registry, "smollm2"))
        with pytest.raises(InvalidModelFile, match=r"is damaged.*Pull or create the model again"):
            await engine.generate("smollm2", "Hello", options={"num_predict": 1})
        assert (await engine.ps()).models == []
        await engine.create("smollm2", from_=smollm2_path)
        reply = await engine.generate("smollm2", "Hello", options={"num_predict": 2, "temperature": 0})
        assert reply.done


def test_a_damaged_template_blob_is_refused_and_replaced_by_the_next_create(registry: Registry, tmp_path: Path) -> None:
    source = tmp_path / "tiny.gguf"
    source.write_bytes(tiny_gguf())
    modelfile = 'FROM ./tiny.gguf\nTEMPLATE """{{ .Prompt }}"""\n'
    (tmp_path / "Modelfile").write_text(modelfile)
    registry.create("tiny", modelfile=tmp_path / "Modelfile")
    _, manifest = registry.find("tiny")
    template = manifest.layer_of(MEDIA_TEMPLATE)
    assert template is not None
    corrupt_in_place(registry.store.blob_path(template.digest), offset=0)

    with pytest.raises(
        InvalidModelFile, match=f"model 'tiny:latest' cannot be used: blob {template.digest} is damaged"
    ):
        registry.resolve("tiny")
    registry.create("tiny", modelfile=tmp_path / "Modelfile")
    assert registry.resolve("tiny").template == "{{ .Prompt }}"


def test_a_pull_replaces_a_corrupted_blob(oci: OCIRegistry, tmp_path: Path) -> None:
    data = tiny_gguf(seed=2)
    manifest = oci.add_model("library/tiny", "latest", data)
    digest = manifest["layers"][0]["digest"]
    name = f"{oci.host}/library/tiny"
    store = BlobStore(tmp_path / "models")
    pull(store, name, settings=FAST)
    corrupt_in_place(store.blob_path(digest))
    registry = Registry(store.root)
    with pytest.raises(InvalidModelFile, match="is damaged"):
        registry.resolve(name)

    served = oci.served[digest]
    pull(store, name, settings=FAST)

    assert oci.served[digest] > served  # fetched again, not trusted for its size
    assert store.blob_path(digest).read_bytes() == data
    registry.resolve(name)


def test_a_hugging_face_pull_replaces_a_corrupted_blob(hub: HFHub, tmp_path: Path) -> None:
    data = tiny_gguf(seed=3)
    hub.add_repo("owner/Tiny-GGUF", {"tiny-Q4_K_M.gguf": data})
    store = BlobStore(tmp_path / "models")
    pull(store, "hf.co/owner/Tiny-GGUF", settings=FAST)
    corrupt_in_place(store.blob_path(sha(data)))

    pull(store, "hf.co/owner/Tiny-GGUF", settings=FAST)

    assert store.blob_path(sha(data)).read_bytes() == data
    Registry(store.root).resolve("hf.co/owner/Tiny-GGUF")


def test_an_upload_replaces_a_corrupted_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "models")
    data = tiny_gguf(seed=6)
    digest = store.add_bytes(data)
    corrupt_in_place(store.blob_path(digest))
    assert not store.has_blob(digest)  # what HEAD /api/blobs asks: the client uploads it again
    with store.blob_writer(expected=digest) as out:
        out.write(data)
        out.commit()
    assert store.has_blob(digest)
    assert store.blob_path(digest).read_bytes() == data


def test_a_blob_is_hashed_once_per_version_of_its_file(tmp_path: Path, hashed: list[int]) -> None:
    source = tmp_path / "tiny.gguf"
    source.write_bytes(tiny_gguf(seed=7))
    settled(source)
    registry = Registry(tmp_path / "models")
    registry.create("tiny", from_=source)
    before = len(hashed)
    for _ in range(3):
        registry.resolve("tiny")
    assert len(hashed) == before  # the copy was hashed as it was written: no read at all

    blob = model_blob(registry, "tiny")
    replacement = tmp_path / "replacement"
    replacement.write_bytes(blob.read_bytes())
    os.replace(settled(replacement), blob)  # a new version of the file, with the same bytes
    for _ in range(3):
        registry.resolve("tiny")
    assert len(hashed) == before + 1


# ---------------------------------------------------------------------------------------------------------------
# Pull, create, copy, delete and prune do not split one another


def _shared_models(oci: OCIRegistry) -> tuple[str, str, str]:
    """Two models on the registry with one GGUF blob in common (each with a template of its own)."""
    data = tiny_gguf(seed=11)
    oci.add_model("library/a", "latest", data, extra=[(MEDIA_TEMPLATE, b"{{ .Prompt }} a")])
    oci.add_model("library/b", "latest", data, extra=[(MEDIA_TEMPLATE, b"{{ .Prompt }} b")])
    return f"{oci.host}/library/a", f"{oci.host}/library/b", sha256_digest(data)


def _all_blobs_there(registry: Registry, name: str) -> bool:
    _, manifest = registry.find(name)
    return all(registry.store.blob_path(digest).is_file() for digest in manifest.digests)


def test_a_delete_between_a_pulls_check_and_its_manifest_does_not_lose_the_blob(
    oci: OCIRegistry, tmp_path: Path
) -> None:
    a, b, shared = _shared_models(oci)
    registry = Registry(tmp_path / "models")
    pull(registry.store, a, settings=FAST)
    deleted: list[str] = []

    def delete_a_when_b_finds_the_blob(event: dict[str, Any]) -> None:
        # The pull of b has just found the shared blob in the store: now the only model naming it goes.
        if event.get("digest") == shared and event["completed"] == event["total"] and not deleted:
            registry.delete(a)
            deleted.append(a)
            assert not registry.store.blob_path(shared).exists()

    pull(registry.store, b, progress=delete_a_when_b_finds_the_blob, settings=FAST)

    assert deleted == [a]
    assert _all_blobs_there(registry, b)
    assert registry.resolve(b).template == "{{ .Prompt }} b"
    assert [m.name for m in registry.list()] == [ModelName.parse(b).display]


def test_pulls_and_deletes_of_models_sharing_a_blob_in_a_race(oci: OCIRegistry, tmp_path: Path) -> None:
    a, b, _ = _shared_models(oci)
    registry = Registry(tmp_path / "models")
    failures: list[str] = []
    errors: list[BaseException] = []

    def cycle(mine: str, rounds: int) -> None:
        try:
            for _ in range(rounds):
                pull(registry.store, mine, settings=FAST)
                if not _all_blobs_there(registry, mine):
                    failures.append(mine)
                registry.delete(mine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=cycle, args=(name, 25)) for name in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and failures == []
    assert registry.list() == []
    assert registry.prune() == []  # every blob went with the last model that named it


def test_a_prune_before_a_pulls_manifest_makes_it_fetch_again(oci: OCIRegistry, tmp_path: Path) -> None:
    a, _, shared = _shared_models(oci)
    registry = Registry(tmp_path / "models")
    pruned: list[str] = []

    def prune_before_the_manifest(event: dict[str, Any]) -> None:
        # The blobs are downloaded and committed, but no manifest names them yet.
        if event["status"] == "writing manifest" and not pruned:
            pruned.extend(registry.prune())

    pull(registry.store, a, progress=prune_before_the_manifest, settings=FAST)

    assert shared.replace(":", "-") in pruned
    assert _all_blobs_there(registry, a)
    assert oci.served[shared] == 2 * len(oci.blobs[shared])  # downloaded twice
    registry.resolve(a)


# ---------------------------------------------------------------------------------------------------------------
# A damaged manifest


def _damage(registry: Registry, name: str) -> Path:
    path = registry.store.manifest_path(ModelName.parse(name))
    path.write_bytes(path.read_bytes()[:-3])  # truncated JSON (its digests still readable)
    return path


def test_a_damaged_manifest_is_a_clear_error_and_can_be_deleted(registry: Registry, tmp_path: Path) -> None:
    source = tmp_path / "tiny.gguf"
    source.write_bytes(tiny_gguf(seed=12))
    registry.create("good", from_=source)
    registry.create("broken", modelfile=f"FROM {source}\nSYSTEM only broken has this\n")
    only_broken = registry.store.blob_path(sha(b"only broken has this"))
    assert only_broken.is_file()
    path = _damage(registry, "broken")

    for call in (registry.resolve, registry.show, registry.find):
        with pytest.raises(InvalidModelFile, match="the manifest of model 'broken:latest' is damaged") as caught:
            call("broken")
        assert str(registry.models_dir) not in str(caught.value) and "manifests/" not in str(caught.value)
    assert [m.name for m in registry.list()] == ["good:latest"]

    registry.delete("broken")

    assert not path.exists()
    assert not only_broken.exists()  # the blobs only it named went with it
    assert [m.name for m in registry.list()] == ["good:latest"]
    registry.resolve("good")
    with pytest.raises(ModelNotFound):
        registry.delete("broken")


def test_a_damaged_manifest_over_http_is_a_client_error_without_the_store_path(home: Path) -> None:
    source = home / "tiny.gguf"
    source.write_bytes(tiny_gguf(seed=13))
    Registry(home / "models").create("broken", from_=source)
    _damage(Registry(home / "models"), "broken")
    with localllm_shim(home) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        shown = client.post("/api/show", json={"model": "broken"})
        assert 400 <= shown.status_code < 500
        assert "broken" in shown.text and str(home) not in shown.text
        assert client.get("/api/tags").status_code == 200
        assert client.request("DELETE", "/api/delete", json={"model": "broken"}).status_code == 200
        assert client.get("/api/tags").json()["models"] == []


# ---------------------------------------------------------------------------------------------------------------
# Templates are compiled at create


@pytest.mark.parametrize(
    "template",
    [
        "{% for message in messages %}{{ message.content }}",  # Jinja: an unclosed for
        "{{ messages[0] }",  # Jinja: an unclosed expression
        "{{ if .System }}{{ .System }}",  # Go: an if without end
        "{{ .Prompt ",  # Go: an unclosed action
    ],
)
def test_create_refuses_a_template_that_does_not_parse(registry: Registry, tmp_path: Path, template: str) -> None:
    source = tmp_path / "tiny.gguf"
    source.write_bytes(tiny_gguf())
    with pytest.raises(TemplateError, match="cannot create 'tiny:latest': its TEMPLATE does not parse"):
        registry.create("tiny", modelfile=f'FROM {source}\nTEMPLATE """{template}"""\n')
    assert registry.list() == []
    assert not registry.store.blobs_dir.exists() or not any(registry.store.blobs_dir.iterdir())
