"""Pulling models: from OCI registries (Ollama's among them) and from Hugging Face.

`pull(store, name)` looks at the host part of `name`:

* ``hf.co/<owner>/<repo>[:<quant>]`` (or ``huggingface.co/...``) lists the
  repository's GGUF files through huggingface-hub, picks the one whose
  quantization matches the tag (``Q4_K_M`` when there is no tag), downloads it
  and writes a manifest with the model layer and a config blob
  (`huggingface`).
* any other host is spoken to as a docker registry (v2 API), as Ollama does:
  the manifest from ``/v2/<namespace>/<model>/manifests/<tag>``, then every
  blob it lists from ``/v2/<namespace>/<model>/blobs/<digest>`` (`oci`).

Either way blobs come down resumably, in parallel byte ranges, and are checked
against their sha256 before they take their real name (`download`). Blobs the
store already holds intact are not downloaded again; the manifest is written
under the store's lock once every blob it names is there.

A host that cannot be reached (a name that does not resolve, a refused
connection) fails the pull at once with `RegistryUnreachable`; failures a retry
can fix (timeouts, a connection cut, 429 and 5xx answers) are retried with
backoff for at most ``$LOCALLLM_PULL_TIMEOUT`` seconds in all, 60 by default
(`retry`).

The call is synchronous and meant to run in a worker thread; progress callbacks
are made from that same thread. Setting the `cancel` event stops the pull
promptly and leaves only resumable partial files behind.
"""

from __future__ import annotations

import threading

from ..names import ModelName
from ..store import BlobStore
from .download import Progress, PullSettings, check_cancel
from .huggingface import HF_HOSTS, gguf_quant, pull_hf, select_gguf
from .oci import pull_oci

__all__ = ["HF_HOSTS", "PullSettings", "gguf_quant", "pull", "select_gguf"]


def pull(
    store: BlobStore,
    name: str | ModelName,
    *,
    progress: Progress | None = None,
    insecure: bool = False,
    cancel: threading.Event | None = None,
    settings: PullSettings | None = None,
) -> None:
    """Download the model `name` into `store`, reporting progress like Ollama's pull stream.

    Events: ``{"status": "pulling manifest"}``, then for each blob
    ``{"status": "pulling <12 hex>", "digest": ..., "total": N, "completed": M}``,
    ``{"status": "verifying sha256 digest"}``, ``{"status": "writing manifest"}`` and
    ``{"status": "success"}``.

    Plain http (to the registry, the hub, or wherever they redirect) needs `insecure`, except to a local
    registry (a loopback address with a port).

    Raises ModelNotFound when the registry has no such model, RegistryUnreachable (at once, without
    retrying) when the registry, the hub or the storage they send downloads to cannot be reached,
    DigestMismatch when a blob's bytes do not hash to its digest, InvalidModelFile when a model file,
    adapter or projector is not a GGUF llama.cpp can load safely (then no manifest is written),
    InvalidRequest when ``$LOCALLLM_PULL_TIMEOUT`` is not a number of seconds, and PullError for every
    other failure (including retries given up on, and cancellation through `cancel`).
    """
    model = ModelName.parse(name)
    settings = settings or PullSettings()
    emit: Progress = progress if progress is not None else (lambda _event: None)
    check_cancel(cancel, model.display)
    if model.host.lower() in HF_HOSTS:
        pull_hf(store, model, emit=emit, insecure=insecure, cancel=cancel, settings=settings)
    else:
        pull_oci(store, model, emit=emit, insecure=insecure, cancel=cancel, settings=settings)
