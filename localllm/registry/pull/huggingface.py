"""Pulling from Hugging Face: ``hf.co/<owner>/<repo>[:<quant>]``.

The repository's files are listed through huggingface-hub; the GGUF file
whose quantization matches the tag (``Q4_K_M`` when there is none) is
downloaded, and a manifest written with the model layer and a config blob.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...errors import ModelNotFound, PullError
from ..names import ModelName
from ..store import MEDIA_CONFIG, MEDIA_MODEL, BlobStore, Layer, Manifest, go_json
from .download import (
    DIGEST_RE,
    BlobDownload,
    Progress,
    PullSettings,
    check_cancel,
    commit_blob,
    commit_pull,
    describe_error,
    holding,
    http_client,
    loopback_with_port,
    short_digest,
)

__all__ = ["HF_HOSTS", "gguf_quant", "pull_hf", "select_gguf"]

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
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = f"{model.namespace}/{model.model}"
    if _hf_offline():
        raise PullError(f"cannot pull '{model.display}': Hugging Face offline mode is on (HF_HUB_OFFLINE)")
    endpoint = _hf_endpoint()
    hub = urlsplit(endpoint)
    if hub.scheme == "http" and not insecure and not loopback_with_port(hub.netloc):
        raise PullError(
            f"cannot pull '{model.display}': the Hugging Face endpoint {endpoint} (HF_ENDPOINT) is plain http;"
            " pass insecure=True to allow it"
        )
    emit({"status": "pulling manifest"})
    api = HfApi(endpoint=endpoint, library_name="localllm")
    try:
        info = api.model_info(repo, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelNotFound(
            f"model '{model.display}' not found: Hugging Face has no repository '{repo}'"
            " (or it is private: set HF_TOKEN)",
            model=model.display,
        ) from None
    except GatedRepoError:
        raise PullError(
            f"the Hugging Face repository '{repo}' is gated: accept its terms on the website and set HF_TOKEN"
        ) from None
    except OfflineModeIsEnabled:
        raise PullError(f"cannot pull '{model.display}': Hugging Face offline mode is on (HF_HUB_OFFLINE)") from None
    except HfHubHTTPError as exc:
        raise PullError(f"listing the files of '{repo}' on {endpoint} failed: {describe_error(exc)}") from None
    except Exception as exc:  # the hub client's transport errors are of its own HTTP library
        raise PullError(f"cannot reach {endpoint} to list the files of '{repo}': {describe_error(exc)}") from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    filename = select_gguf(list(siblings), model.tag, repo)
    sibling = siblings[filename]
    revision = info.sha or "main"
    check_cancel(cancel, model.display)

    def fetch_lfs(digest: str, size: int) -> bool:
        """Download the file unless the store has it; whether it did."""
        with holding(store, [digest], cancel, model.display):
            if store.has_blob(digest):
                emit({"status": f"pulling {short_digest(digest)}", "digest": digest, "total": size, "completed": size})
                return False
            url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
            _download_lfs(store, url, endpoint, digest, size, model, emit, cancel, settings, insecure)
            emit({"status": "verifying sha256 digest"})
            commit_blob(store, digest, model.display)
            return True

    def fetch() -> tuple[list[Layer], list[str]]:
        if sibling.lfs is not None and DIGEST_RE.fullmatch("sha256:" + str(sibling.lfs.sha256).lower()):
            digest = "sha256:" + str(sibling.lfs.sha256).lower()
            size = int(sibling.lfs.size)
            downloaded = fetch_lfs(digest, size)
        else:
            digest, size = _hf_download_small(store, repo, filename, revision, endpoint, model, emit)
            emit({"status": "verifying sha256 digest"})
            downloaded = True
        return [Layer(media_type=MEDIA_MODEL, digest=digest, size=size)], [digest] if downloaded else []

    commit_pull(store, model, fetch, lambda layers: _hf_manifest(store, layers[0]), emit)


def _download_lfs(
    store: BlobStore,
    url: str,
    endpoint: str,
    digest: str,
    size: int,
    model: ModelName,
    emit: Progress,
    cancel: threading.Event | None,
    settings: PullSettings,
    insecure: bool,
) -> None:
    from huggingface_hub.utils import build_hf_headers

    hub_headers = build_hf_headers(library_name="localllm")
    hub_host = urlsplit(endpoint).netloc

    def headers_for(target: str) -> dict[str, str]:
        """The token goes to the hub only, never to the storage it redirects to."""
        if urlsplit(target).netloc == hub_host:
            return dict(hub_headers)
        return {k: v for k, v in hub_headers.items() if k.lower() != "authorization"}

    with http_client(settings, insecure=insecure) as client:
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
        ).run()


def _hf_download_small(
    store: BlobStore, repo: str, filename: str, revision: str, endpoint: str, model: ModelName, emit: Progress
) -> tuple[str, int]:
    """A file kept in git rather than LFS (so no sha256 is published): through huggingface-hub's own download."""
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(
            repo,
            filename,
            revision=revision,
            cache_dir=store.root / ".hf-cache",
            endpoint=endpoint,
            library_name="localllm",
        )
    except Exception as exc:
        raise PullError(f"downloading {filename} from '{repo}' failed: {describe_error(exc)}") from None
    path = Path(str(local)).resolve()
    digest = store.add_file(path)
    size = path.stat().st_size
    emit({"status": f"pulling {short_digest(digest)}", "digest": digest, "total": size, "completed": size})
    return digest, size


def _hf_manifest(store: BlobStore, model_layer: Layer) -> Manifest:
    """The manifest of a model pulled from Hugging Face: its GGUF file and a config blob made for it."""
    from ...gguf import read_info

    info = read_info(store.blob_path(model_layer.digest))
    config = _hf_config(info.architecture, info.parameter_size, info.file_type, model_layer.digest)
    config_data = go_json(config)
    config_digest = store.add_bytes(config_data)
    return Manifest(
        config=Layer(media_type=MEDIA_CONFIG, digest=config_digest, size=len(config_data)),
        layers=(model_layer,),
    )


def _hf_config(architecture: str, parameter_size: str, file_type: str, digest: str) -> Mapping[str, Any]:
    return {
        "model_format": "gguf",
        "model_family": architecture,
        "model_families": [architecture] if architecture else [],
        "model_type": parameter_size,
        "file_type": file_type,
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest]},
    }
