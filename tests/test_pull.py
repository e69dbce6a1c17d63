"""Pulling models from a docker registry and from a Hugging Face hub, both served on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import HFHub, LoopbackServer, OCIRegistry, sha256_digest, tiny_gguf

import localllm
from localllm.errors import (
    DigestMismatch,
    InvalidModelFile,
    InvalidRequest,
    ModelNotFound,
    PullError,
    RegistryUnreachable,
)
from localllm.registry.names import ModelName
from localllm.registry.pull import PullSettings, gguf_quant, pull, select_gguf
from localllm.registry.store import MEDIA_MODEL, MEDIA_TEMPLATE, BlobStore

FAST = PullSettings(
    part_size=16 * 1024,
    connections=4,
    stall_timeout=0.4,
    connect_timeout=2.0,
    retry_timeout=30.0,
    max_retries=2,
    backoff=0.01,
    max_backoff=0.05,
)
SECRET = b"SECRET-BODY: internal metadata a server must never see relayed"
SEQUENTIAL = PullSettings(
    part_size=16 * 1024,
    connections=1,
    stall_timeout=2.0,
    connect_timeout=2.0,
    retry_timeout=30.0,
    max_retries=0,
    backoff=0.01,
)
# Retries bounded only by a long time, with short backoffs: a retry that should not happen shows in the counts.
PATIENT = PullSettings(
    part_size=16 * 1024, connections=4, stall_timeout=2.0, connect_timeout=2.0, retry_timeout=60.0, backoff=0.01
)


@pytest.fixture
def registry() -> Iterator[OCIRegistry]:
    server = OCIRegistry()
    with server:
        yield server


def use_hub(monkeypatch: pytest.MonkeyPatch, server: HFHub) -> None:
    """Point Hugging Face pulls at `server`, online, with a token."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HFHub]:
    server = HFHub()
    with server:
        use_hub(monkeypatch, server)
        yield server


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (host, port) this process resolves from now on: one per connection attempt, whatever the library."""
    seen: list[tuple[str, int]] = []
    resolve = socket.getaddrinfo

    def recording(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((host.decode() if isinstance(host, bytes) else host, int(port) if port is not None else 0))
        return resolve(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return seen


def closed_port() -> int:
    """A loopback port nothing listens on: it was just free, and is closed again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "models")


@pytest.fixture(scope="module")
def big_gguf() -> bytes:
    return tiny_gguf(seed=1, rows=1500)  # about 100 KiB: several 16 KiB parts


class Events(list[dict[str, Any]]):
    def __call__(self, event: dict[str, Any]) -> None:
        self.append(dict(event))

    @property
    def statuses(self) -> list[str]:
        out: list[str] = []
        for event in self:
            if not out or out[-1] != event["status"]:
                out.append(event["status"])
        return out

    def last_for(self, digest: str) -> dict[str, Any]:
        return [e for e in self if e.get("digest") == digest][-1]


def leftovers(store: BlobStore) -> list[str]:
    """Files in blobs/ that are not finished blobs."""
    if not store.blobs_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in store.blobs_dir.iterdir()
        if p.name.endswith(("partial", ".json", ".tmp")) or p.name.startswith(".")
    )


def sidecar_completed(store: BlobStore, digest: str) -> int:
    partial = store.partial_path(digest)
    state = json.loads(partial.with_name(partial.name + ".json").read_text())
    return sum(p["completed"] for p in state["parts"])


def probes(server: LoopbackServer, digest: str) -> int:
    return sum(1 for r in server.requests if digest in r.path and r.headers.get("range") == "bytes=0-0")


# --------------------------------------------------------------------------------------------------- OCI


def test_full_pull_writes_blobs_and_manifest(registry: OCIRegistry, store: BlobStore) -> None:
    model = tiny_gguf(seed=0, chat_template="{{ messages }}")
    template = b"{{ .Prompt }}"
    manifest = registry.add_model("library/tiny", "latest", model, extra=[(MEDIA_TEMPLATE, template)])
    events = Events()

    pull(store, f"{registry.host}/library/tiny", progress=events, settings=FAST)

    assert events.statuses[0] == "pulling manifest"
    assert events.statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    name = ModelName.parse(f"{registry.host}/library/tiny:latest")
    written = store.read_manifest(name)
    assert written.to_json() == registry.manifests[("library/tiny", "latest")]  # the registry's bytes, kept
    for entry in [*manifest["layers"], manifest["config"]]:
        digest = entry["digest"]
        assert store.blob_path(digest).read_bytes() == registry.blobs[digest]
        last = events.last_for(digest)
        assert last["status"] == f"pulling {digest[7:19]}"
        assert last["total"] == last["completed"] == entry["size"]
    assert written.layer_of(MEDIA_MODEL) is not None
    assert leftovers(store) == []

    # Pulling again downloads no blob: they are all in the store already.
    served = sum(registry.served.values())
    again = Events()
    pull(store, f"{registry.host}/library/tiny:latest", progress=again, settings=FAST)
    assert sum(registry.served.values()) == served
    assert again.statuses[-1] == "success"


def test_large_blob_in_parallel_ranges_through_a_redirect(
    registry: OCIRegistry, store: BlobStore, big_gguf: bytes
) -> None:
    manifest = registry.add_model("ns/big", "v1", big_gguf)
    digest = manifest["layers"][0]["digest"]
    registry.redirect_blobs = True  # to /cdn/..., which refuses requests carrying credentials
    registry.token = "secret"  # the registry itself wants a bearer token (handed out anonymously)

    pull(store, f"{registry.host}/ns/big:v1", settings=FAST)

    assert store.blob_path(digest).read_bytes() == big_gguf
    cdn = registry.cdn
    ranged = [r for r in cdn.requests_to(f"/cdn/{digest}") if r.headers.get("range") != "bytes=0-0"]
    assert len(ranged) == -(-len(big_gguf) // FAST.part_size)  # one request per part
    assert all("authorization" not in r.headers for r in cdn.requests)
    assert registry.requests_to("/token")
    # The blob address was resolved once, not once per part; no byte was fetched twice.
    assert len(registry.requests_to(f"/v2/ns/big/blobs/{digest}")) == 1
    assert registry.served[digest] == 0
    assert cdn.served[digest] == len(big_gguf) + probes(cdn, digest)


def test_interrupted_pull_resumes_where_it_stopped(registry: OCIRegistry, store: BlobStore, big_gguf: bytes) -> None:
    manifest = registry.add_model("library/big", "latest", big_gguf)
    digest = manifest["layers"][0]["digest"]
    cut = 40_000
    registry.cut_at[digest] = cut
    name = f"{registry.host}/library/big"

    with pytest.raises(PullError):
        pull(store, name, settings=SEQUENTIAL)  # no retries: the cut ends this pull

    assert not store.has_blob(digest)
    assert store.partial_path(digest).is_file()
    done = sidecar_completed(store, digest)
    first = registry.served[digest]
    assert done == first - probes(registry, digest) == cut - 1  # everything received was kept
    with pytest.raises(ModelNotFound):
        store.read_manifest(ModelName.parse(name))

    before_probes = probes(registry, digest)
    events = Events()
    pull(store, name, progress=events, settings=SEQUENTIAL)

    assert store.blob_path(digest).read_bytes() == big_gguf
    second = registry.served[digest] - first - (probes(registry, digest) - before_probes)
    assert second == len(big_gguf) - done  # only the rest was downloaded
    first_report = next(e for e in events if e.get("digest") == digest)
    assert first_report["completed"] == done
    assert leftovers(store) == []


def test_cut_connection_is_retried_within_one_pull(registry: OCIRegistry, store: BlobStore, big_gguf: bytes) -> None:
    manifest = registry.add_model("library/big", "latest", big_gguf)
    digest = manifest["layers"][0]["digest"]
    registry.cut_at[digest] = 30_000

    pull(store, f"{registry.host}/library/big", settings=FAST)

    assert store.blob_path(digest).read_bytes() == big_gguf
    assert registry.served[digest] == len(big_gguf) + probes(registry, digest)  # no byte fetched twice


def test_server_without_ranges_is_downloaded_in_one_piece(
    registry: OCIRegistry, store: BlobStore, big_gguf: bytes
) -> None:
    manifest = registry.add_model("library/big", "latest", big_gguf)
    digest = manifest["layers"][0]["digest"]
    registry.ranges = False

    pull(store, f"{registry.host}/library/big", settings=FAST)

    assert store.blob_path(digest).read_bytes() == big_gguf


def test_concurrent_pulls_of_one_model_download_it_once(
    registry: OCIRegistry, store: BlobStore, big_gguf: bytes
) -> None:
    manifest = registry.add_model("library/big", "latest", big_gguf)
    digest = manifest["layers"][0]["digest"]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pull(store, f"{registry.host}/library/big", settings=FAST)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert store.blob_path(digest).read_bytes() == big_gguf
    assert registry.served[digest] == len(big_gguf) + probes(registry, digest)
    assert probes(registry, digest) == 1


def test_wrong_bytes_raise_digest_mismatch(registry: OCIRegistry, store: BlobStore) -> None:
    manifest = registry.add_model("library/tiny", "latest", tiny_gguf())
    digest = manifest["layers"][0]["digest"]
    registry.corrupt.add(digest)
    name = f"{registry.host}/library/tiny"

    with pytest.raises(DigestMismatch, match=digest):
        pull(store, name, settings=FAST)

    assert not store.blob_path(digest).exists()
    assert leftovers(store) == []  # neither the partial file nor its progress record survive
    with pytest.raises(ModelNotFound):
        store.read_manifest(ModelName.parse(name))


def test_stalled_server_times_out(registry: OCIRegistry, store: BlobStore) -> None:
    manifest = registry.add_model("library/tiny", "latest", tiny_gguf())
    digest = manifest["layers"][0]["digest"]
    registry.stall[digest] = (1000, 30.0, -1)  # every request goes silent at byte 1000

    started = time.monotonic()
    with pytest.raises(PullError, match="stalled"):
        pull(store, f"{registry.host}/library/tiny", settings=FAST)
    elapsed = time.monotonic() - started

    # (1 + max_retries) stalls of stall_timeout each, plus short backoffs.
    assert elapsed < (2 + 1) * FAST.stall_timeout + 2.0
    assert FAST.max_retries == 2
    assert not store.has_blob(digest)


def test_a_stall_once_is_retried(registry: OCIRegistry, store: BlobStore) -> None:
    model = tiny_gguf()
    manifest = registry.add_model("library/tiny", "latest", model)
    digest = manifest["layers"][0]["digest"]
    registry.stall[digest] = (1000, 30.0, 1)

    pull(store, f"{registry.host}/library/tiny", settings=FAST)

    assert store.blob_path(digest).read_bytes() == model


def test_unknown_model_is_model_not_found(registry: OCIRegistry, store: BlobStore) -> None:
    with pytest.raises(ModelNotFound, match="not found in the registry"):
        pull(store, f"{registry.host}/library/nothing:here", settings=FAST)
    assert not store.manifests_dir.exists() or not any(store.manifests_dir.rglob("*"))


def test_server_errors_on_the_manifest_are_retried(registry: OCIRegistry, store: BlobStore) -> None:
    registry.add_model("library/tiny", "latest", tiny_gguf())
    registry.manifest_failures = 2

    pull(store, f"{registry.host}/library/tiny", settings=FAST)

    assert len(registry.requests_to("/manifests/latest")) == 3


def test_refused_access_is_pull_error(registry: OCIRegistry, store: BlobStore) -> None:
    registry.add_model("library/tiny", "latest", tiny_gguf())
    registry.token = "secret"
    registry.token_grant = False

    with pytest.raises(PullError, match="refused access") as info:
        pull(store, f"{registry.host}/library/tiny", settings=FAST)
    assert not isinstance(info.value, ModelNotFound)


def test_plain_http_needs_insecure(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PullError, match=r"over plain http.*insecure=True"):
        pull(store, "http://registry.invalid/library/tiny", settings=FAST)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(PullError, match=r"HF_ENDPOINT\) is plain http.*insecure=True"):
        pull(store, "hf.co/owner/Tiny-GGUF", settings=FAST)


def test_a_redirect_to_another_host_is_followed_but_not_off_https(registry: OCIRegistry, store: BlobStore) -> None:
    data = tiny_gguf(seed=14)
    registry.add_model("library/tiny", "latest", data)
    registry.redirect_blobs = True  # to the CDN: another port, so another host
    pull(store, f"{registry.host}/library/tiny", settings=FAST)
    assert store.blob_path(sha256_digest(data)).read_bytes() == data

    registry.add_model("library/other", "latest", tiny_gguf(seed=15))
    registry.redirect_base = "http://blobs.example.invalid"
    with pytest.raises(PullError, match=r"blobs\.example\.invalid over plain http.*insecure=True"):
        pull(store, f"{registry.host}/library/other", settings=FAST)


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("kind", ["manifests", "blobs"])
def test_a_registry_error_names_status_and_host_never_the_body(
    registry: OCIRegistry, store: BlobStore, kind: str, status: int
) -> None:
    registry.add_model("library/tiny", "latest", tiny_gguf())
    registry.errors[kind] = (status, SECRET)
    with pytest.raises(PullError) as caught:
        pull(store, f"{registry.host}/library/tiny", settings=FAST)
    assert f"HTTP {status} from {registry.host}" in str(caught.value)
    assert b"SECRET" not in str(caught.value).encode()


def test_cancel_leaves_only_the_resumable_partial(registry: OCIRegistry, store: BlobStore, big_gguf: bytes) -> None:
    manifest = registry.add_model("library/big", "latest", big_gguf)
    digest = manifest["layers"][0]["digest"]
    registry.stall[digest] = (20_000, 30.0, 1)  # goes silent mid-blob: only a cancel can end the wait
    cancel = threading.Event()
    settings = PullSettings(part_size=1 << 20, stall_timeout=20.0, backoff=0.01)

    def progress(event: dict[str, Any]) -> None:
        if event.get("digest") == digest and event["completed"] > 0:
            cancel.set()

    started = time.monotonic()
    with pytest.raises(PullError, match="cancelled"):
        pull(store, f"{registry.host}/library/big", progress=progress, cancel=cancel, settings=settings)
    assert time.monotonic() - started < 1.5  # the blocked read was woken, not waited out

    partial = store.partial_path(digest)
    assert leftovers(store) == sorted([partial.name, partial.name + ".json"])
    assert not any(store.blobs_dir.glob("sha256-????????????????????????????????????????????????????????????????"))
    assert not store.manifests_dir.exists() or not any(store.manifests_dir.rglob("*"))
    done = sidecar_completed(store, digest)
    assert 0 < done <= 20_000

    served = registry.served[digest]
    pull(store, f"{registry.host}/library/big", settings=settings)
    assert store.blob_path(digest).read_bytes() == big_gguf
    assert registry.served[digest] - served - probes(registry, digest) == len(big_gguf) - done


def test_cancel_before_start(registry: OCIRegistry, store: BlobStore) -> None:
    registry.add_model("library/tiny", "latest", tiny_gguf())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(PullError, match="cancelled"):
        pull(store, f"{registry.host}/library/tiny", cancel=cancel, settings=FAST)
    assert registry.requests == []


# ---------------------------------------------------------------------------------------- unreachable hosts, retries


class FlakyRegistry(OCIRegistry):
    """A registry whose first answers to some requests are errors: `flaky[kind]` = [(status, headers), ...]."""

    def __init__(self) -> None:
        super().__init__()
        self.flaky: dict[str, list[tuple[int, dict[str, str]]]] = {}

    def handle(self, handler: Any, method: str) -> None:
        match = re.search(r"/(manifests|blobs)/", handler.path)
        with self.lock:
            queue = self.flaky.get(match.group(1), []) if match else []
            answer = queue.pop(0) if queue else None
        if answer is not None:
            status, headers = answer
            self.send_status(handler, status, b"not now", headers)
            return
        super().handle(handler, method)


@pytest.fixture
def flaky() -> Iterator[FlakyRegistry]:
    server = FlakyRegistry()
    with server:
        yield server


def test_a_registry_whose_name_does_not_resolve_fails_at_once(store: BlobStore, lookups: list[tuple[str, int]]) -> None:
    with pytest.raises(RegistryUnreachable) as caught:
        pull(store, "nosuchhost.invalid/library/x:latest", settings=PATIENT)

    error = caught.value
    assert isinstance(error, PullError) and error.host == "nosuchhost.invalid"
    assert error.status_code == 502 != 404  # "if e.status_code == 404: pull(...)" does not loop on it
    message = str(error)
    assert "cannot reach the registry nosuchhost.invalid" in message
    assert "does not resolve" in message and "network" in message and "host in the model name" in message
    assert lookups.count(("nosuchhost.invalid", 443)) == 1  # one try, no retry
    assert leftovers(store) == []


def test_a_registry_refusing_connections_fails_at_once(store: BlobStore, lookups: list[tuple[str, int]]) -> None:
    port = closed_port()
    with pytest.raises(RegistryUnreachable, match=rf"cannot reach the registry 127\.0\.0\.1:{port}: .*refused"):
        pull(store, f"127.0.0.1:{port}/library/tiny", settings=PATIENT)
    assert lookups.count(("127.0.0.1", port)) == 1


def test_an_unreachable_proxy_is_named(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch, lookups: list[tuple[str, int]]
) -> None:
    port = closed_port()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RegistryUnreachable, match=r"refused.*the proxy set in HTTPS_PROXY"):
        pull(store, "registry.nosuchhost.invalid/library/x", settings=PATIENT)
    assert lookups.count(("127.0.0.1", port)) == 1


def test_unreachable_blob_storage_is_named(
    registry: OCIRegistry, store: BlobStore, lookups: list[tuple[str, int]]
) -> None:
    registry.add_model("library/tiny", "latest", tiny_gguf())
    registry.redirect_blobs = True
    registry.redirect_base = "http://blobs.nosuchhost.invalid"
    with pytest.raises(RegistryUnreachable) as caught:
        pull(store, f"{registry.host}/library/tiny", insecure=True, settings=PATIENT)
    assert caught.value.host == "blobs.nosuchhost.invalid"
    assert f"cannot reach blobs.nosuchhost.invalid (named by the registry {registry.host})" in str(caught.value)
    assert lookups.count(("blobs.nosuchhost.invalid", 80)) == 1
    assert len(registry.requests_to("/blobs/")) == 1


def test_the_sync_client_raises_the_same_error(tmp_path: Path, lookups: list[tuple[str, int]]) -> None:
    with localllm.Client(tmp_path / "home") as client:
        with pytest.raises(localllm.RegistryUnreachable, match=r"nosuchhost\.invalid") as caught:
            client.pull("nosuchhost.invalid/library/x:latest")
    assert caught.value.status_code == 502
    assert lookups.count(("nosuchhost.invalid", 443)) == 1


@pytest.mark.parametrize(("kind", "status"), [("manifests", 503), ("manifests", 429), ("blobs", 503), ("blobs", 502)])
def test_server_errors_a_few_times_then_success_still_pulls(
    flaky: FlakyRegistry, store: BlobStore, big_gguf: bytes, kind: str, status: int
) -> None:
    manifest = flaky.add_model("library/big", "latest", big_gguf)
    digest = manifest["layers"][0]["digest"]
    flaky.flaky[kind] = [(status, {}), (status, {"Retry-After": "0"})]

    pull(store, f"{flaky.host}/library/big", settings=PATIENT)

    assert store.blob_path(digest).read_bytes() == big_gguf
    assert flaky.flaky[kind] == []
    assert len(flaky.requests_to("/manifests/latest")) == (3 if kind == "manifests" else 1)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 410, 451])
@pytest.mark.parametrize("kind", ["manifests", "blobs"])
def test_a_client_error_is_never_retried(registry: OCIRegistry, store: BlobStore, kind: str, status: int) -> None:
    registry.add_model("library/tiny", "latest", tiny_gguf())
    registry.errors[kind] = (status, b"no")
    with pytest.raises((PullError, ModelNotFound)) as caught:
        pull(store, f"{registry.host}/library/tiny", settings=PATIENT)
    assert not isinstance(caught.value, RegistryUnreachable)
    assert len(registry.requests_to(f"/{kind}/")) == 1
    assert isinstance(caught.value, ModelNotFound) == (kind == "manifests" and status == 404)


def test_retries_stop_after_the_time_set_in_the_environment(
    registry: OCIRegistry, store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_model("library/tiny", "latest", tiny_gguf())
    registry.errors["manifests"] = (503, b"down for maintenance")
    monkeypatch.setenv("LOCALLLM_PULL_TIMEOUT", "0.2")
    settings = PullSettings(backoff=0.01, max_backoff=0.02)  # no limit on the number of retries: only time
    assert settings.retry_timeout == 0.2

    with pytest.raises(PullError) as caught:
        pull(store, f"{registry.host}/library/tiny", settings=settings)

    message = str(caught.value)
    found = re.search(r"gave up after (\d+) tries", message)
    assert found is not None, message
    tries = int(found.group(1))
    assert tries == len(registry.requests_to("/manifests/")) > 1
    assert f"HTTP 503 from {registry.host}" in message and "LOCALLLM_PULL_TIMEOUT" in message
    assert not isinstance(caught.value, RegistryUnreachable)


def test_no_retry_when_the_time_is_zero_or_the_wait_asked_is_too_long(
    flaky: FlakyRegistry, store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky.add_model("library/tiny", "latest", tiny_gguf())
    monkeypatch.setenv("LOCALLLM_PULL_TIMEOUT", "0")
    flaky.flaky["manifests"] = [(503, {})]
    with pytest.raises(PullError, match="gave up after 1 try"):
        pull(store, f"{flaky.host}/library/tiny", settings=PullSettings(backoff=0.01))
    assert len(flaky.requests_to("/manifests/")) == 1

    # A server that asks for an hour's wait is not waited for when the pull retries for a minute.
    monkeypatch.setenv("LOCALLLM_PULL_TIMEOUT", "60")
    flaky.flaky["manifests"] = [(429, {"Retry-After": "3600"})]
    with pytest.raises(PullError, match=r"HTTP 429.*gave up after 1 try"):
        pull(store, f"{flaky.host}/library/tiny", settings=PullSettings(backoff=0.01))
    assert len(flaky.requests_to("/manifests/")) == 2


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_pull_timeout_is_named(store: BlobStore, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LOCALLLM_PULL_TIMEOUT", value)
    with pytest.raises(InvalidRequest, match="LOCALLLM_PULL_TIMEOUT must be a number of seconds"):
        pull(store, "nosuchhost.invalid/library/x:latest")


# --------------------------------------------------------------------------------------------------- Hugging Face


def _quant_repo(hub: HFHub, repo: str = "owner/Tiny-GGUF", *, lfs: bool = True) -> dict[str, bytes]:
    files = {
        "README.md": b"# tiny\n",
        "tiny-Q4_K_M.gguf": tiny_gguf(seed=4, rows=600, chat_template="{% for m in messages %}{{ m }}{% endfor %}"),
        "tiny-Q8_0.gguf": tiny_gguf(seed=8, rows=600, file_type=7),
        "tiny-F16.gguf": tiny_gguf(seed=16, file_type=1),
    }
    hub.add_repo(repo, files, lfs=lfs)
    return files


def test_hf_pull_picks_the_quant_of_the_tag(hub: HFHub, store: BlobStore) -> None:
    files = _quant_repo(hub)
    events = Events()

    pull(store, "hf.co/owner/Tiny-GGUF:q8_0", progress=events, settings=FAST)

    manifest = store.read_manifest(ModelName.parse("hf.co/owner/Tiny-GGUF:q8_0"))
    layer = manifest.layer_of(MEDIA_MODEL)
    assert layer is not None and layer.digest == sha256_digest(files["tiny-Q8_0.gguf"])
    assert store.blob_path(layer.digest).read_bytes() == files["tiny-Q8_0.gguf"]
    config = json.loads(store.read_blob(manifest.config.digest))
    assert config["model_family"] == "llama" and config["file_type"] == "Q8_0"
    assert config["rootfs"]["diff_ids"] == [layer.digest]
    assert events.statuses == [
        "pulling manifest",
        f"pulling {layer.digest[7:19]}",
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    # The listing asked for file metadata; the token went to the hub and not to the storage it redirects to.
    listing = hub.requests_to("/api/models/owner/Tiny-GGUF")
    assert listing and "blobs=true" in listing[0].path.lower()
    assert listing[0].headers.get("authorization") == "Bearer hf_test_token"
    sha = layer.digest[7:]
    assert hub.cdn.requests_to(f"/cdn/{sha}")
    assert all("authorization" not in r.headers for r in hub.cdn.requests)
    assert hub.cdn.served[sha] == len(files["tiny-Q8_0.gguf"]) + probes(hub.cdn, sha)
    assert leftovers(store) == []


def test_hf_pull_without_tag_takes_q4_k_m(hub: HFHub, store: BlobStore) -> None:
    files = _quant_repo(hub)

    # With the default part size the file comes in one request, following the hub's redirect.
    pull(store, "huggingface.co/owner/Tiny-GGUF", settings=PullSettings(stall_timeout=5.0, backoff=0.01))

    manifest = store.read_manifest(ModelName.parse("huggingface.co/owner/Tiny-GGUF:latest"))
    layer = manifest.layer_of(MEDIA_MODEL)
    assert layer is not None and layer.digest == sha256_digest(files["tiny-Q4_K_M.gguf"])
    downloads = hub.cdn.requests_to(f"/cdn/{layer.digest[7:]}")
    assert len(downloads) == 1 and "range" not in downloads[0].headers
    assert "authorization" not in downloads[0].headers
    assert hub.requests_to("/resolve/")[0].headers.get("authorization") == "Bearer hf_test_token"


def test_hf_missing_quant_lists_the_available_ones(hub: HFHub, store: BlobStore) -> None:
    _quant_repo(hub)
    with pytest.raises(PullError) as info:
        pull(store, "hf.co/owner/Tiny-GGUF:Q2_K", settings=FAST)
    message = str(info.value)
    assert "Q2_K" in message
    for quant in ("Q4_K_M", "Q8_0", "F16"):
        assert quant in message
    assert hub.cdn.requests == []


def test_hf_split_gguf_is_refused(hub: HFHub, store: BlobStore) -> None:
    hub.add_repo(
        "owner/Big-GGUF",
        {"big-Q4_K_M-00001-of-00002.gguf": b"GGUF one", "big-Q4_K_M-00002-of-00002.gguf": b"GGUF two"},
    )
    with pytest.raises(PullError, match="split"):
        pull(store, "hf.co/owner/Big-GGUF:Q4_K_M", settings=FAST)


def test_hf_unknown_repo_is_model_not_found(hub: HFHub, store: BlobStore) -> None:
    with pytest.raises(ModelNotFound, match="owner/Missing"):
        pull(store, "hf.co/owner/Missing:Q4_K_M", settings=FAST)


def test_hf_file_outside_lfs_is_downloaded_into_the_store(hub: HFHub, store: BlobStore) -> None:
    files = _quant_repo(hub, "owner/Plain-GGUF", lfs=False)

    pull(store, "hf.co/owner/Plain-GGUF:F16", settings=FAST)

    manifest = store.read_manifest(ModelName.parse("hf.co/owner/Plain-GGUF:F16"))
    layer = manifest.layer_of(MEDIA_MODEL)
    assert layer is not None and store.blob_path(layer.digest).read_bytes() == files["tiny-F16.gguf"]
    downloads = hub.requests_to("/owner/Plain-GGUF/resolve/")
    assert [r.method for r in downloads] == ["GET"]  # one request, with the token (the hub's own host)
    assert downloads[0].headers.get("authorization") == "Bearer hf_test_token"
    assert sorted(p.name for p in store.root.iterdir()) == ["blobs", "manifests"]  # no second copy anywhere
    assert leftovers(store) == []


def test_hf_file_outside_lfs_is_checked_against_its_git_blob_id(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tampering(HFHub):
        """Serves every file with its last byte changed, while the listing names the true one."""

        def send_body(self, handler: Any, key: str, data: bytes, **kwargs: Any) -> None:
            super().send_body(handler, key, data[:-1] + bytes([data[-1] ^ 1]), **kwargs)

    tampering = Tampering()
    with tampering:
        use_hub(monkeypatch, tampering)
        files = _quant_repo(tampering, "owner/Plain-GGUF", lfs=False)
        with pytest.raises(DigestMismatch, match="git blob id"):
            pull(store, "hf.co/owner/Plain-GGUF:F16", settings=FAST)
    assert not any(store.blob_path(sha256_digest(data)).exists() for data in files.values())
    assert leftovers(store) == []


def test_hf_file_that_is_not_gguf_is_invalid(hub: HFHub, store: BlobStore) -> None:
    hub.add_repo("owner/Bad-GGUF", {"bad-Q4_K_M.gguf": b"this is not a gguf file at all" * 10})
    with pytest.raises(InvalidModelFile):
        pull(store, "hf.co/owner/Bad-GGUF", settings=FAST)
    with pytest.raises(ModelNotFound):
        store.read_manifest(ModelName.parse("hf.co/owner/Bad-GGUF:latest"))


@pytest.mark.parametrize("status", [400, 500])
def test_a_hub_error_names_status_and_host_never_the_body(hub: HFHub, store: BlobStore, status: int) -> None:
    _quant_repo(hub)
    hub.errors["api"] = (status, SECRET)
    with pytest.raises(PullError) as caught:
        pull(store, "hf.co/owner/Tiny-GGUF", settings=FAST)
    assert f"HTTP {status} from {hub.host}" in str(caught.value)
    assert b"SECRET" not in str(caught.value).encode()
    assert len(hub.requests_to("/api/")) == (1 if status == 400 else 3)  # a 5xx is retried (twice, in FAST)


def test_hf_gated_repo_says_so_at_once(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    class Gated(HFHub):
        def handle(self, handler: Any, method: str) -> None:
            self.send_json(handler, {"error": "gated"}, 403, {"X-Error-Code": "GatedRepo"})

    gated = Gated()
    with gated:
        use_hub(monkeypatch, gated)
        with pytest.raises(PullError, match="is gated: accept its terms on the website and set HF_TOKEN"):
            pull(store, "hf.co/owner/Gated-GGUF", settings=PATIENT)
        assert len(gated.requests) == 1


def test_hf_hub_refusing_connections_fails_at_once(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch, lookups: list[tuple[str, int]]
) -> None:
    port = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # nothing listens there
    with pytest.raises(RegistryUnreachable, match="cannot reach") as caught:
        pull(store, "hf.co/owner/Tiny-GGUF", settings=PATIENT)
    message = str(caught.value)
    assert f"the Hugging Face hub 127.0.0.1:{port}" in message and "HF_ENDPOINT" in message
    assert "refused" in message
    assert lookups.count(("127.0.0.1", port)) == 1  # one connection attempt, no retry


def test_hf_hub_whose_name_does_not_resolve_fails_at_once(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch, lookups: list[tuple[str, int]]
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.nosuchhost.invalid")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(RegistryUnreachable) as caught:
        pull(store, "hf.co/owner/Tiny-GGUF", settings=PATIENT)
    assert caught.value.host == "hub.nosuchhost.invalid"
    assert "does not resolve" in str(caught.value) and "HF_ENDPOINT" in str(caught.value)
    assert [lookup for lookup in lookups if lookup[0] == "hub.nosuchhost.invalid"] == [("hub.nosuchhost.invalid", 443)]


def test_hf_offline_mode_refuses(hub: HFHub, store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _quant_repo(hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RegistryUnreachable, match=r"offline mode is on \(HF_HUB_OFFLINE\).*unset HF_HUB_OFFLINE"):
        pull(store, "hf.co/owner/Tiny-GGUF", settings=FAST)
    assert hub.requests == []


def test_hf_server_errors_on_the_listing_are_retried(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    class Flaky(HFHub):
        """Answers the first two listings with 503."""

        failures = 2

        def handle(self, handler: Any, method: str) -> None:
            if handler.path.startswith("/api/") and self.failures > 0:
                self.failures -= 1
                self.send_status(handler, 503, b"try again")
                return
            super().handle(handler, method)

    flaky = Flaky()
    with flaky:
        use_hub(monkeypatch, flaky)
        files = _quant_repo(flaky)
        pull(store, "hf.co/owner/Tiny-GGUF", settings=PATIENT)
        assert len(flaky.requests_to("/api/models/owner/Tiny-GGUF")) == 3
    assert store.has_blob(sha256_digest(files["tiny-Q4_K_M.gguf"]))


@pytest.mark.parametrize(
    ("filename", "quant"),
    [
        ("model-Q4_K_M.gguf", "Q4_K_M"),
        ("Meta-Llama-3-8B-Instruct.Q5_K_S.gguf", "Q5_K_S"),
        ("smollm2-135m-instruct-q8_0.gguf", "Q8_0"),
        ("Qwen2.5-7B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("gemma-3-270m-it-BF16.gguf", "BF16"),
        ("sub/dir/model-UD-Q4_K_XL.gguf", "Q4_K_XL"),
        ("model-Q4_K_M-00001-of-00003.gguf", "Q4_K_M"),
        ("model.gguf", None),
    ],
)
def test_gguf_quant_from_file_names(filename: str, quant: str | None) -> None:
    assert gguf_quant(filename) == quant


def test_select_gguf_rules() -> None:
    files = ["a-Q8_0.gguf", "a-Q4_K_S.gguf", "a-Q4_K_M.gguf", "mmproj-a-F16.gguf", "README.md"]
    assert select_gguf(files, None, "o/r") == "a-Q4_K_M.gguf"
    assert select_gguf(files, "latest", "o/r") == "a-Q4_K_M.gguf"
    assert select_gguf(files, "q4_k_s", "o/r") == "a-Q4_K_S.gguf"
    assert select_gguf(["x-Q8_0.gguf", "x-Q6_K.gguf"], None, "o/r") == "x-Q6_K.gguf"  # next in preference
    assert select_gguf(["only.gguf"], None, "o/r") == "only.gguf"
    with pytest.raises(PullError, match="no GGUF files"):
        select_gguf(["README.md", "model.safetensors"], None, "o/r")
    with pytest.raises(PullError, match=r"available quantizations: Q8_0, Q4_K_S, Q4_K_M$"):
        select_gguf(files, "Q2_K", "o/r")  # lists what is there; projectors are not models


@pytest.mark.fast
def test_the_projector_pulled_beside_a_model_file() -> None:
    """The mmproj beside the chosen file, the most precise first; none when the repository has none."""
    from localllm.registry.pull.huggingface import select_projector

    files = ["a-Q4_K_M.gguf", "mmproj-a-Q8_0.gguf", "mmproj-a-F16.gguf", "mmproj-a-F32.gguf", "README.md"]
    assert select_projector(files, "a-Q4_K_M.gguf") == "mmproj-a-F16.gguf"
    assert select_projector(["q/a-Q4_K_M.gguf", "mmproj-F16.gguf", "q/mmproj-Q8_0.gguf"], "q/a-Q4_K_M.gguf") == (
        "q/mmproj-Q8_0.gguf"
    )
    assert select_projector(["a-Q4_K_M.gguf", "README.md"], "a-Q4_K_M.gguf") is None
