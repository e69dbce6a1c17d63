"""Pulling from Hugging Face: ``hf.co/<owner>/<repo>[:<quant>]``.

The repository's files are listed through the hub's API (``HF_ENDPOINT``,
else huggingface.co); the GGUF file whose quantization matches the tag
(``Q4_K_M`` when there is none) is downloaded, with the repository's
multimodal projector (an ``mmproj`` GGUF) when it has one, and a manifest
written with the model layer, the projector layer and a config blob.

Both requests go through our own client, not huggingface-hub's (of which only
the token, the offline switch and the file address are used): a hub out of
reach fails the pull at once (`RegistryUnreachable`), failures are retried as
`retry` says, and no request goes anywhere but the hub and the storage it
redirects to. Files in LFS come down resumably and are checked against their
sha256; a file kept in git is checked against its git blob id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import attrs
import httpx

from ...errors import DigestMismatch, ModelNotFound, PullError, RegistryUnreachable
from ..names import ModelName
from ..store import MEDIA_CONFIG, MEDIA_MODEL, MEDIA_PROJECTOR, BlobStore, Layer, Manifest, go_json
from .download import (
    DIGEST_RE,
    BlobDownload,
    Progress,
    PullSettings,
    check_cancel,
    commit_blob,
    commit_pull,
    describe_error,
    describe_status,
    holding,
    http_client,
    loopback_with_port,
    short_digest,
)
from .retry import Origin, Retries, TransientError, host_of, retry_after_seconds, wait_to_retry

__all__ = ["HF_HOSTS", "gguf_quant", "pull_hf", "select_gguf", "select_projector"]

log = logging.getLogger("localllm.registry.pull")

HF_HOSTS = frozenset({"hf.co", "huggingface.co", "www.huggingface.co"})
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
#: What a Hugging Face repository pulled without a tag gives: Q4_K_M (as with Ollama), else the first of these it has.
HF_QUANT_PREFERENCE = (
    "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "IQ4_XS", "IQ4_NL", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1",
    "Q6_K", "Q8_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "BF16", "F16", "F32",
)  # fmt: skip

_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:I?Q|TQ)\d+(?:_[A-Za-z0-9]+)*|BF16|FP16|FP32|F16|F32|MXFP4)(?=$|[-.])",
    re.IGNORECASE,
)


def gguf_quant(filename: str) -> str | None:
    """The quantization a GGUF file name carries (``model-Q4_K_M.gguf`` -> ``Q4_K_M``), upper-cased."""
    stem = filename.rsplit("/", 1)[-1]
    stem = _SPLIT_RE.sub("", stem)
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    found = _QUANT_RE.findall(stem)
    return found[-1].upper() if found else None


def _is_projector(filename: str) -> bool:
    return "mmproj" in filename.rsplit("/", 1)[-1].lower()


def select_gguf(files: list[str], tag: str | None, repo: str) -> str:
    """The file of `files` to pull for `tag` (None or 'latest': the preferred default quantization).

    Raises PullError when nothing matches (naming the quantizations there are) or
    when the match is split into shards.
    """
    ggufs = [f for f in files if f.lower().endswith(".gguf") and not _is_projector(f)]
    if not ggufs:
        raise PullError(f"the Hugging Face repository '{repo}' has no GGUF files")
    quants: dict[str, list[str]] = {}
    for file in ggufs:
        quants.setdefault(gguf_quant(file) or file, []).append(file)
    available = ", ".join(quants)
    wanted = None if tag is None or tag.lower() == "latest" else tag
    if wanted is None:
        choice = next((quants[q] for q in HF_QUANT_PREFERENCE if q in quants), None)
        if choice is None:
            if len(quants) != 1:
                raise PullError(
                    f"the Hugging Face repository '{repo}' has no Q4_K_M file; pick one of its quantizations with a"
                    f" tag (hf.co/{repo}:<quant>): {available}"
                )
            choice = next(iter(quants.values()))
        label = "the default quantization"
    else:
        folded = wanted.lower()
        choice = next((files_ for q, files_ in quants.items() if q.lower() == folded), None)
        if choice is None:
            choice = [f for f in ggufs if f.lower().removesuffix(".gguf").endswith(("-" + folded, "." + folded))]
        if not choice:
            raise PullError(
                f"the Hugging Face repository '{repo}' has no GGUF file for '{wanted}'; available quantizations:"
                f" {available}"
            )
        label = f"'{wanted}'"
    whole = [f for f in choice if not _SPLIT_RE.search(f)]
    if not whole:
        raise PullError(
            f"the GGUF for {label} in '{repo}' is split into shards ({choice[0]}, ...); split GGUF files are not"
            " supported: merge them with llama-gguf-split --merge and create the model from the result"
        )
    return sorted(whole, key=lambda f: (f.count("/"), len(f), f))[0]


#: The projector taken when a repository offers several: the most precise first (projectors are small).
_PROJECTOR_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")


def select_projector(files: list[str], model_file: str) -> str | None:
    """The multimodal projector to pull beside `model_file`, or None when the repository has none.

    One in the model file's folder wins; then F16, BF16, F32, Q8_0, then the shortest name.
    """
    folder = model_file.rpartition("/")[0]
    projectors = [f for f in files if f.lower().endswith(".gguf") and _is_projector(f) and not _SPLIT_RE.search(f)]
    if not projectors:
        return None
    beside = [f for f in projectors if f.rpartition("/")[0] == folder]
    candidates = beside or projectors

    def rank(name: str) -> tuple[int, int, str]:
        quant = gguf_quant(name) or ""
        order = _PROJECTOR_PREFERENCE.index(quant) if quant in _PROJECTOR_PREFERENCE else len(_PROJECTOR_PREFERENCE)
        return order, len(name), name

    return min(candidates, key=rank)


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def _hf_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def pull_hf(
    store: BlobStore,
    model: ModelName,
    *,
    emit: Progress,
    insecure: bool,
    cancel: threading.Event | None,
    settings: PullSettings,
) -> None:
    from huggingface_hub import hf_hub_url

    repo = f"{model.namespace}/{model.model}"
    endpoint = _hf_endpoint()
    if _hf_offline():
        raise _offline_error(model, endpoint)
    hub = urlsplit(endpoint)
    if hub.scheme == "http" and not insecure and not loopback_with_port(hub.netloc):
        raise PullError(
            f"cannot pull '{model.display}': the Hugging Face endpoint {endpoint} (HF_ENDPOINT) is plain http;"
            " pass insecure=True to allow it"
        )
    origin = Origin(label="the Hugging Face hub", url=endpoint, hint="HF_ENDPOINT (the hub's address, for a mirror)")
    headers_for = _hub_headers(endpoint)
    emit({"status": "pulling manifest"})
    with http_client(settings, insecure=insecure) as client:
        listing = _list_repo(client, endpoint, repo, headers_for, model, origin, settings, cancel)
        filename = select_gguf(list(listing.files), model.tag, repo)
        wanted = [(filename, MEDIA_MODEL)]
        projector = select_projector(list(listing.files), filename)
        if projector is not None:
            wanted.append((projector, MEDIA_PROJECTOR))
        check_cancel(cancel, model.display)

        def fetch_lfs(digest: str, size: int, url: str) -> bool:
            """Download the file unless the store has it; whether it did."""
            with holding(store, [digest], cancel, model.display):
                if store.has_blob(digest):
                    emit(
                        {
                            "status": f"pulling {short_digest(digest)}",
                            "digest": digest,
                            "total": size,
                            "completed": size,
                        }
                    )
                    return False
                BlobDownload(
                    client=client,
                    store=store,
                    digest=digest,
                    size=size,
                    url=url,
                    headers_for=headers_for,
                    settings=settings,
                    cancel=cancel,
                    emit=emit,
                    what=model.display,
                    origin=origin,
                ).run()
                emit({"status": "verifying sha256 digest"})
                commit_blob(store, digest, model.display)
                return True

        def fetch_one(name: str, media_type: str) -> tuple[Layer, bool]:
            file = listing.files[name]
            url = hf_hub_url(repo, name, revision=listing.sha or "main", endpoint=endpoint)
            if file.sha256 is not None and file.size is not None:
                digest = file.sha256
                size = file.size
                downloaded = fetch_lfs(digest, size, url)
            else:
                digest, size = _download_git_file(
                    client, store, url, file, headers_for, model, origin, settings, cancel
                )
                emit({"status": f"pulling {short_digest(digest)}", "digest": digest, "total": size, "completed": size})
                emit({"status": "verifying sha256 digest"})
                downloaded = True
            return Layer(media_type=media_type, digest=digest, size=size), downloaded

        def fetch() -> tuple[list[Layer], list[str]]:
            layers: list[Layer] = []
            downloaded: list[str] = []
            for name, media_type in wanted:
                layer, fresh = fetch_one(name, media_type)
                layers.append(layer)
                if fresh:
                    downloaded.append(layer.digest)
            return layers, downloaded

        commit_pull(store, model, fetch, lambda layers: _hf_manifest(store, layers), emit)


def _offline_error(model: ModelName, endpoint: str) -> RegistryUnreachable:
    return RegistryUnreachable(
        f"cannot pull '{model.display}': Hugging Face offline mode is on (HF_HUB_OFFLINE), so the hub is not"
        " contacted; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to pull",
        host=host_of(endpoint),
    )


def _hub_headers(endpoint: str) -> Callable[[str], dict[str, str]]:
    """The headers of a request to an address: the token goes to the hub only, never to the storage it redirects to.

    The token is huggingface-hub's (``HF_TOKEN``, else the one ``hf auth login`` saved), unless
    ``HF_HUB_DISABLE_IMPLICIT_TOKEN`` is set.
    """
    from huggingface_hub import constants, get_token

    token = None if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN else get_token()
    hub_host = urlsplit(endpoint).netloc

    def headers_for(target: str) -> dict[str, str]:
        if token and urlsplit(target).netloc == hub_host:
            return {"Authorization": f"Bearer {token}"}
        return {}

    return headers_for


@attrs.frozen
class _HubFile:
    """A file of a repository as the hub lists it."""

    #: ``sha256:<hex>`` of a file kept in LFS; None for one kept in git (no sha256 is published then).
    sha256: str | None
    size: int | None
    #: The git blob id (a sha1 of "blob <size>\0" and the bytes), which the hub lists for every file.
    blob_id: str | None


@attrs.frozen
class _Listing:
    sha: str | None
    files: dict[str, _HubFile]


def _list_repo(
    client: httpx.Client,
    endpoint: str,
    repo: str,
    headers_for: Callable[[str], dict[str, str]],
    model: ModelName,
    origin: Origin,
    settings: PullSettings,
    cancel: threading.Event | None,
) -> _Listing:
    """The repository's files with their sizes and hashes (``/api/models/<repo>?blobs=true``, as huggingface-hub
    asks for them); failures a retry can fix are retried."""
    url = f"{endpoint}/api/models/{quote(repo)}"
    retries = Retries(settings)
    while True:
        check_cancel(cancel, model.display)
        after = None
        try:
            response = client.get(url, params={"blobs": "true"}, headers=headers_for(url), follow_redirects=True)
        except httpx.TimeoutException:
            reason = f"no answer for {settings.stall_timeout:g} seconds"
        except httpx.TransportError as exc:
            origin.check(exc, model.display, url)
            reason = describe_error(exc)
        else:
            status = response.status_code
            if status == 200:
                return _parse_listing(response.content, repo, endpoint)
            answer = describe_status(status, response.url)
            error_code = response.headers.get("x-error-code", "")
            if error_code == "GatedRepo":
                raise PullError(
                    f"the Hugging Face repository '{repo}' is gated: accept its terms on the website and set HF_TOKEN"
                )
            if error_code in ("RepoNotFound", "RevisionNotFound") or status in (401, 404):
                # (The hub answers 401 for a private repository as for one that does not exist.)
                raise ModelNotFound(
                    f"model '{model.display}' not found: Hugging Face has no repository '{repo}'"
                    " (or it is private: set HF_TOKEN)",
                    model=model.display,
                )
            if status < 500 and status != 429:
                raise PullError(f"listing the files of '{repo}' on {endpoint} failed: {answer}")
            reason, after = answer, retry_after_seconds(response.headers)
        delay = retries.delay(after)
        if delay is None:
            raise PullError(f"listing the files of '{repo}' on {endpoint} failed: {reason}; {retries.gave_up()}")
        log.info("listing the files of %s failed (%s); retrying", repo, reason)
        wait_to_retry(delay, cancel, model.display)


def _parse_listing(raw: bytes, repo: str, endpoint: str) -> _Listing:
    bad = PullError(f"{endpoint} sent a listing of '{repo}' that is not what the Hugging Face API answers")
    try:
        info = json.loads(raw)
    except ValueError:
        raise bad from None
    if not isinstance(info, dict) or not isinstance(info.get("siblings", []), list):
        raise bad
    files: dict[str, _HubFile] = {}
    for entry in info.get("siblings") or []:
        name = entry.get("rfilename") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise bad
        lfs = entry.get("lfs")
        sha256 = None
        size = _count(entry.get("size"))
        if isinstance(lfs, dict):
            digest = "sha256:" + str(lfs.get("sha256", "")).lower()
            if DIGEST_RE.fullmatch(digest) and _count(lfs.get("size")) is not None:
                sha256, size = digest, _count(lfs.get("size"))
        blob_id = entry.get("blobId")
        files[name] = _HubFile(sha256=sha256, size=size, blob_id=blob_id if isinstance(blob_id, str) else None)
    sha = info.get("sha")
    return _Listing(sha=sha if isinstance(sha, str) and sha else None, files=files)


def _count(value: object) -> int | None:
    """`value` if it is a whole number of bytes (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _download_git_file(
    client: httpx.Client,
    store: BlobStore,
    url: str,
    file: _HubFile,
    headers_for: Callable[[str], dict[str, str]],
    model: ModelName,
    origin: Origin,
    settings: PullSettings,
    cancel: threading.Event | None,
) -> tuple[str, int]:
    """Download a file kept in git (in one request: such files are small) into the store; its digest and size."""
    retries = Retries(settings)
    while True:
        check_cancel(cancel, model.display)
        after = None
        try:
            return _get_git_file(client, store, url, file, headers_for, model, cancel)
        except TransientError as exc:
            reason, after = str(exc), exc.after
        except httpx.TimeoutException:
            reason = f"no data for {settings.stall_timeout:g} seconds (stalled)"
        except httpx.TransportError as exc:
            origin.check(exc, model.display, url)
            reason = describe_error(exc)
        delay = retries.delay(after)
        if delay is None:
            raise PullError(f"pulling '{model.display}': downloading {url} failed: {reason}; {retries.gave_up()}")
        log.info("downloading %s failed (%s); retrying", url, reason)
        wait_to_retry(delay, cancel, model.display)


def _get_git_file(
    client: httpx.Client,
    store: BlobStore,
    url: str,
    file: _HubFile,
    headers_for: Callable[[str], dict[str, str]],
    model: ModelName,
    cancel: threading.Event | None,
) -> tuple[str, int]:
    headers = {"Accept-Encoding": "identity", **headers_for(url)}
    with client.stream("GET", url, headers=headers, follow_redirects=True) as response:
        status = response.status_code
        if status != 200:
            answer = describe_status(status, response.url)
            if status >= 500 or status == 429:
                raise TransientError(answer, retry_after_seconds(response.headers))
            raise PullError(f"pulling '{model.display}': downloading {url} failed: {answer}")
        # Git names a file by the sha1 of "blob <size>\0" and its bytes: that is what the hub lists as its blob id.
        git = hashlib.sha1(b"blob %d\0" % file.size, usedforsecurity=False) if file.size is not None else None
        with store.blob_writer() as out:
            for chunk in response.iter_bytes():
                check_cancel(cancel, model.display)
                if file.size is not None and out.size + len(chunk) > file.size:
                    raise PullError(f"pulling '{model.display}': the hub sent more than the {file.size} bytes it lists")
                out.write(chunk)
                if git is not None:
                    git.update(chunk)
            if file.size is not None and out.size < file.size:
                raise TransientError(f"the connection closed after {out.size} of {file.size} bytes")
            if git is not None and file.blob_id and git.hexdigest() != file.blob_id.lower():
                raise DigestMismatch(
                    f"pulling '{model.display}': {url} does not hash to the git blob id the hub lists"
                    f" ({file.blob_id}); the download was discarded",
                    expected=file.blob_id,
                    actual=git.hexdigest(),
                )
            return out.commit(), out.size


def _hf_manifest(store: BlobStore, layers: Sequence[Layer]) -> Manifest:
    """The manifest of a model pulled from Hugging Face: its GGUF file (and projector) and a config blob made for it."""
    from ...gguf import read_info

    model_layer = layers[0]
    info = read_info(store.blob_path(model_layer.digest))
    config = _hf_config(info.architecture, info.parameter_size, info.file_type, [layer.digest for layer in layers])
    config_data = go_json(config)
    config_digest = store.add_bytes(config_data)
    return Manifest(
        config=Layer(media_type=MEDIA_CONFIG, digest=config_digest, size=len(config_data)),
        layers=tuple(layers),
    )


def _hf_config(architecture: str, parameter_size: str, file_type: str, digests: list[str]) -> Mapping[str, Any]:
    return {
        "model_format": "gguf",
        "model_family": architecture,
        "model_families": [architecture] if architecture else [],
        "model_type": parameter_size,
        "file_type": file_type,
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": digests},
    }
