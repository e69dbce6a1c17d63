"""The blob store: Ollama's layout, atomic blobs and manifests, dedupe, prune."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from localllm import Engine
from localllm.errors import BlobTooLarge, DigestMismatch, LocalLLMError, ModelNotFound
from localllm.registry import store as store_module
from localllm.registry.names import ModelName
from localllm.registry.store import (
    MEDIA_CONFIG,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    BlobStore,
    Layer,
    Manifest,
    go_json,
)

pytestmark = pytest.mark.fast


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def real_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "models")


def make_manifest(store: BlobStore, *payloads: bytes) -> Manifest:
    config = store.add_bytes(b'{"model_format":"gguf"}')
    layers = [Layer(MEDIA_MODEL, store.add_bytes(p), len(p)) for p in payloads]
    return Manifest(config=Layer(MEDIA_CONFIG, config, 23), layers=tuple(layers))


# ---------------------------------------------------------------- digests and paths


def test_blob_paths_follow_ollama_layout(store: BlobStore) -> None:
    digest = "sha256:" + "ab" * 32
    assert store.blob_path(digest) == store.root / "blobs" / ("sha256-" + "ab" * 32)
    assert store.blob_path("sha256-" + "AB" * 32) == store.blob_path(digest)
    assert store.partial_path(digest).name == "sha256-" + "ab" * 32 + "-partial"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256:abc",
        "md5:" + "a" * 64,
        "sha256:" + "g" * 64,
        "sha256:" + "a" * 64 + "/../x",
        "../sha256:" + "a" * 64,
    ],
)
def test_bad_digests_are_refused(store: BlobStore, bad: str) -> None:
    with pytest.raises(LocalLLMError):
        store.blob_path(bad)


# ---------------------------------------------------------------- adding blobs


def test_add_bytes_and_dedupe(store: BlobStore) -> None:
    digest = store.add_bytes(b"hello")
    assert digest == sha(b"hello")
    assert store.has_blob(digest)
    assert store.blob_path(digest).read_bytes() == b"hello"
    assert store.add_bytes(b"hello") == digest
    assert real_files(store.blobs_dir) == [digest.replace(":", "-")]


def test_add_file_copies_and_keeps_the_modification_time(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    seen: list[tuple[int, int]] = []
    digest = store.add_file(source, progress=lambda done, total: seen.append((done, total)))
    assert digest == sha(source.read_bytes())
    blob = store.blob_path(digest)
    assert blob.read_bytes() == source.read_bytes()
    assert blob.stat().st_ino != source.stat().st_ino  # a copy: editing the source cannot reach the blob
    assert blob.stat().st_mtime_ns == source.stat().st_mtime_ns
    assert seen[-1] == (source.stat().st_size, source.stat().st_size)
    assert real_files(store.blobs_dir) == [blob.name]
    assert source.exists()


def test_add_file_renames_a_temporary_file_of_the_store(store: BlobStore) -> None:
    scratch = store.temp_path()  # what a conversion or quantization writes to
    scratch.write_bytes(b"converted weights")
    digest = store.add_file(scratch)
    assert digest == sha(b"converted weights")
    assert not scratch.exists()  # renamed into place, not copied
    assert real_files(store.blobs_dir) == [digest.replace(":", "-")]


def test_failed_add_leaves_no_blob_under_a_real_name(store: BlobStore, tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * (3 * 1024 * 1024))

    calls = {"n": 0}
    real_update = hashlib.sha256

    class Exploding:
        def __init__(self) -> None:
            self._h = real_update()

        def update(self, chunk: bytes) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk on fire")
            self._h.update(chunk)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    monkeypatch.setattr(store_module.hashlib, "sha256", Exploding)
    with pytest.raises(OSError, match="disk on fire"):
        store.add_file(source)
    monkeypatch.undo()
    assert real_files(store.blobs_dir) == []  # neither the blob nor the temporary copy
    assert not store.has_blob(sha(source.read_bytes()))


def test_a_crash_mid_copy_leaves_only_a_temp_file_that_prune_removes(store: BlobStore, tmp_path: Path) -> None:
    store.blobs_dir.mkdir(parents=True)
    leftover = store.blobs_dir / ".localllm-tmp-deadbeef"
    leftover.write_bytes(b"half a blob")
    partial = store.partial_path(sha(b"anything"))
    partial.write_bytes(b"half a download")
    assert store.list_manifests() == []
    removed = store.prune()
    assert sorted(removed) == sorted([leftover.name, partial.name])
    assert real_files(store.blobs_dir) == []


def test_concurrent_add_file_of_the_same_file_writes_once(store: BlobStore, tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "shared.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024))
    writes: list[int] = []
    real_add = BlobStore._add_file

    def counting(self: BlobStore, *args, **kwargs) -> str:
        writes.append(1)
        time.sleep(0.05)  # make the threads overlap
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(BlobStore, "_add_file", counting)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(store.add_file(source))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 8
    assert len(writes) == 1
    assert real_files(store.blobs_dir) == [results[0].replace(":", "-")]


def test_concurrent_adds_of_equal_content_from_different_files(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(512 * 1024)
    sources = []
    for i in range(6):
        path = tmp_path / f"copy{i}.bin"
        path.write_bytes(data)
        sources.append(path)
    results: list[str] = []
    threads = [threading.Thread(target=lambda p=p: results.append(store.add_file(p))) for p in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {sha(data)}
    assert real_files(store.blobs_dir) == [sha(data).replace(":", "-")]
    assert store.blob_path(sha(data)).read_bytes() == data


# ---------------------------------------------------------------- partial downloads


def test_commit_partial(store: BlobStore) -> None:
    data = b"downloaded bytes"
    digest = sha(data)
    store.blobs_dir.mkdir(parents=True)
    store.partial_path(digest).write_bytes(data)
    assert store.commit_partial(digest) == store.blob_path(digest)
    assert store.blob_path(digest).read_bytes() == data
    assert real_files(store.blobs_dir) == [digest.replace(":", "-")]


def test_commit_partial_mismatch_deletes_and_raises(store: BlobStore) -> None:
    digest = sha(b"what the registry promised")
    store.blobs_dir.mkdir(parents=True)
    store.partial_path(digest).write_bytes(b"something else")
    with pytest.raises(DigestMismatch) as caught:
        store.commit_partial(digest)
    assert (caught.value.expected, caught.value.actual) == (digest, sha(b"something else"))
    assert real_files(store.blobs_dir) == []


# ---------------------------------------------------------------- writing blobs from chunks


def test_blob_writer_hashes_then_renames(store: BlobStore) -> None:
    digest = sha(b"one two three")
    with store.blob_writer(expected=digest) as out:
        for chunk in (b"one ", b"two ", b"three"):
            out.write(chunk)
        assert not store.has_blob(digest)  # only a temporary file so far
        assert out.commit() == digest
    assert store.blob_path(digest).read_bytes() == b"one two three"
    assert real_files(store.blobs_dir) == [digest.replace(":", "-")]


def test_blob_writer_refuses_other_bytes_and_leaves_nothing(store: BlobStore) -> None:
    expected = sha(b"promised")
    with pytest.raises(DigestMismatch) as caught, store.blob_writer(expected=expected) as out:
        out.write(b"delivered")
        out.commit()
    assert (caught.value.expected, caught.value.actual) == (expected, sha(b"delivered"))
    assert real_files(store.blobs_dir) == []


def test_blob_writer_stops_at_max_size(store: BlobStore) -> None:
    with pytest.raises(BlobTooLarge) as caught, store.blob_writer(max_size=4) as out:
        out.write(b"1234")
        out.write(b"5")
    assert caught.value.limit == 4
    assert real_files(store.blobs_dir) == []


def test_blob_writer_left_without_commit_leaves_nothing(store: BlobStore) -> None:
    with store.blob_writer() as out:
        out.write(b"half a blob")
    assert real_files(store.blobs_dir) == []


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_engine_adds_blobs_from_chunks(home: Path) -> None:
    data = b"GGUF" + os.urandom(5000)
    digest = sha(data)
    async with Engine(home) as engine:
        assert not await engine.has_blob(digest)
        await engine.add_blob(digest, _chunks(data[:100], data[100:]), max_size=len(data))
        assert await engine.has_blob(digest)
        with pytest.raises(DigestMismatch):
            await engine.add_blob(sha(b"other"), _chunks(data))
        with pytest.raises(BlobTooLarge):
            await engine.add_blob(digest, _chunks(data), max_size=len(data) - 1)
        blobs = engine.registry.store.blobs_dir
    assert real_files(blobs) == [digest.replace(":", "-")]
    assert (blobs / digest.replace(":", "-")).read_bytes() == data


# ---------------------------------------------------------------- manifests


def test_manifest_json_matches_ollama() -> None:
    text = (
        '{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
        '"config":{"mediaType":"application/vnd.docker.container.image.v1+json",'
        '"digest":"sha256:' + "1" * 64 + '","size":485},'
        '"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:' + "2" * 64 + '",'
        '"size":98362432,"from":"smollm2:latest"},'
        '{"mediaType":"application/vnd.ollama.image.params","digest":"sha256:' + "3" * 64 + '","size":32}]}\n'
    )
    manifest = Manifest.from_json(text)
    assert manifest.layers[0].from_ == "smollm2:latest"
    assert manifest.layers[1].from_ is None
    assert manifest.size == 485 + 98362432 + 32
    rebuilt = Manifest(config=manifest.config, layers=manifest.layers)
    assert rebuilt.to_json() == text.encode()
    assert rebuilt == manifest
    assert manifest.digest == hashlib.sha256(text.encode()).hexdigest()


def test_manifest_keeps_foreign_bytes_until_changed() -> None:
    pretty = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": MEDIA_CONFIG, "digest": "sha256:" + "a" * 64, "size": 1},
            "layers": [{"mediaType": MEDIA_MODEL, "digest": "sha256:" + "b" * 64, "size": 2}],
        },
        indent=2,
    ).encode()
    manifest = Manifest.from_json(pretty)
    assert manifest.to_json() == pretty
    assert manifest.digest == hashlib.sha256(pretty).hexdigest()
    import attrs

    changed = attrs.evolve(manifest, layers=())
    assert changed.raw is None
    assert changed.to_json() != pretty


def test_go_json_escapes_like_go() -> None:
    assert go_json({"stop": ["<|im_end|>"], "temperature": 0.7}) == (
        b'{"stop":["\\u003c|im_end|\\u003e"],"temperature":0.7}\n'
    )


def test_write_read_list_delete_manifest(store: BlobStore) -> None:
    name = ModelName.parse("SmolLM2:Q4")
    manifest = make_manifest(store, b"weights")
    store.write_manifest(name, manifest)
    path = store.root / "manifests" / "registry.ollama.ai" / "library" / "SmolLM2" / "Q4"
    assert path.is_file()
    assert store.read_manifest(ModelName.parse("smollm2:q4")) == manifest
    listed = store.list_manifests()
    assert [(n.display, m) for n, m, _ in listed] == [("SmolLM2:Q4", manifest)]
    # a new tag of the same model lands in the existing folder, whatever its case
    store.write_manifest(ModelName.parse("smollm2:other"), manifest)
    assert (path.parent / "other").is_file()
    assert store.resolve_name(ModelName.parse("SMOLLM2:OTHER")).display == "SmolLM2:other"
    store.delete_manifest(ModelName.parse("smollm2:q4"))
    store.delete_manifest(ModelName.parse("smollm2:other"))
    assert not (store.root / "manifests" / "registry.ollama.ai").exists()  # empty folders go too
    with pytest.raises(ModelNotFound):
        store.read_manifest(name)
    with pytest.raises(ModelNotFound):
        store.delete_manifest(name)


def test_write_manifest_is_atomic(store: BlobStore, monkeypatch) -> None:
    name = ModelName.parse("m")
    first = make_manifest(store, b"one")
    store.write_manifest(name, first)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(store_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.write_manifest(name, make_manifest(store, b"two"))
    monkeypatch.undo()
    assert store.read_manifest(name) == first
    folder = store.manifest_path(name).parent
    assert real_files(folder) == ["latest"]


def test_damaged_manifests_are_skipped_but_protect_their_blobs(store: BlobStore) -> None:
    good = make_manifest(store, b"good")
    store.write_manifest(ModelName.parse("good"), good)
    kept = store.add_bytes(b"only the damaged manifest names me")
    damaged = store.root / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"layers": [{"digest": "' + kept + '"')  # truncated JSON
    assert [n.display for n, _, _ in store.list_manifests()] == ["good:latest"]
    store.add_bytes(b"orphan")
    removed = store.prune()
    assert removed == [sha(b"orphan").replace(":", "-")]
    assert store.has_blob(kept)


def test_prune_and_remove_blobs(store: BlobStore) -> None:
    a = make_manifest(store, b"shared", b"only-a")
    b = make_manifest(store, b"shared")
    store.write_manifest(ModelName.parse("a"), a)
    store.write_manifest(ModelName.parse("b"), b)
    store.delete_manifest(ModelName.parse("a"))
    removed = store.remove_blobs(a.digests)
    assert removed == [sha(b"only-a")]
    assert store.has_blob(sha(b"shared"))
    assert store.has_blob(b.config.digest)
    orphan = store.add_bytes(b"orphan")
    assert store.prune(grace=3600) == []  # too young
    assert store.prune() == [orphan.replace(":", "-")]
    assert store.prune() == []


def test_params_blob_layer_roundtrip(store: BlobStore) -> None:
    data = go_json({"stop": ["<|im_end|>"], "temperature": 0.7})
    layer = Layer(MEDIA_PARAMS, store.add_bytes(data), len(data))
    assert json.loads(store.read_blob(layer.digest)) == {"stop": ["<|im_end|>"], "temperature": 0.7}
