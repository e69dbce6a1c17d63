"""Pulling from an OCI (docker v2) registry, as Ollama does.

The manifest comes from ``/v2/<namespace>/<model>/manifests/<tag>``, then
every blob it lists from ``/v2/<namespace>/<model>/blobs/<digest>``; an
anonymous Bearer token is fetched when the registry asks for one.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from urllib.parse import urlsplit

import attrs
import httpx

from ...errors import DigestMismatch, LocalLLMError, ModelNotFound, PullError
from ..names import ModelName
from ..store import MEDIA_MANIFEST, BlobStore, Manifest
from .download import (
    DIGEST_RE,
    BlobDownload,
    Progress,
    PullSettings,
    check_cancel,
    check_gguf_layers,
    commit_blob,
    describe_error,
    holding,
    http_client,
    short_digest,
    sleep_backoff,
)

__all__ = ["pull_oci"]

log = logging.getLogger("localllm.registry.pull")

_ACCEPT_MANIFEST = ", ".join((MEDIA_MANIFEST, "application/vnd.oci.image.manifest.v1+json"))
_LIST_MEDIA_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)


def _loopback_with_port(host: str) -> bool:
    """Whether `host` is ``localhost``, ``127.0.0.1`` or ``[::1]`` with an explicit port (a local registry)."""
    try:
        parts = urlsplit("//" + host)
        port = parts.port
    except ValueError:
        return False
    return port is not None and parts.hostname in ("localhost", "127.0.0.1", "::1")


@attrs.define
class _Registry:
    """Where a model's manifest and blobs live, and how to authenticate there."""

    client: httpx.Client
    base: str  # scheme://host
    repository: str  # namespace/model
    settings: PullSettings
    cancel: threading.Event | None
    headers: dict[str, str] = attrs.Factory(dict)  # sent to the registry's own host only
    token_tried: bool = False

    def url(self, kind: str, ref: str) -> str:
        return f"{self.base}/v2/{self.repository}/{kind}/{ref}"

    def headers_for(self, url: str) -> dict[str, str]:
        """Credentials go to the registry's host only, never to a CDN it redirects to."""
        return dict(self.headers) if urlsplit(url).netloc == urlsplit(self.base).netloc else {}

    def authenticate(self, response: httpx.Response) -> bool:
        """Answer a Bearer challenge with an anonymous pull token; False when there is none to answer."""
        if self.token_tried:
            return False
        self.token_tried = True
        challenge = response.headers.get("www-authenticate", "")
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() != "bearer":
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.pop("realm", None)
        if not realm:
            return False
        query = {k: v for k, v in fields.items() if k in ("service", "scope")}
        query.setdefault("scope", f"repository:{self.repository}:pull")
        try:
            answer = self.client.get(realm, params=query)
            answer.raise_for_status()
            token = answer.json().get("token") or answer.json().get("access_token")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.info("could not get a registry token from %s: %s", realm, exc)
            return False
        if not token:
            return False
        self.headers["Authorization"] = f"Bearer {token}"
        return True


def _registry_base(model: ModelName, insecure: bool) -> str:
    host = model.host
    local = _loopback_with_port(host)
    if model.scheme == "http" and not insecure and not local:
        raise PullError(
            f"cannot pull '{model.display}' over plain http: the name asks for http://; pass insecure=True to allow it"
        )
    plain = insecure or model.scheme == "http" or local
    return f"{'http' if plain else 'https'}://{host}"


def pull_oci(
    store: BlobStore,
    model: ModelName,
    *,
    emit: Progress,
    insecure: bool,
    cancel: threading.Event | None,
    settings: PullSettings,
) -> None:
    emit({"status": "pulling manifest"})
    with http_client(settings) as client:
        registry = _Registry(
            client=client,
            base=_registry_base(model, insecure),
            repository=f"{model.namespace}/{model.model}",
            settings=settings,
            cancel=cancel,
        )
        raw = _fetch_manifest(registry, model)
        manifest = _parse_manifest(raw, model)
        blobs: dict[str, int] = {}
        for layer in (*manifest.layers, manifest.config):
            blobs.setdefault(layer.digest, layer.size)
        missing = [d for d in blobs if not store.has_blob(d)]
        with holding(store, missing, cancel, model.display):
            fetched = []
            for digest, size in blobs.items():
                check_cancel(cancel, model.display)
                if store.has_blob(digest):
                    emit(
                        {
                            "status": f"pulling {short_digest(digest)}",
                            "digest": digest,
                            "total": size,
                            "completed": size,
                        }
                    )
                    continue
                BlobDownload(
                    client=client,
                    store=store,
                    digest=digest,
                    size=size,
                    url=registry.url("blobs", digest),
                    headers_for=registry.headers_for,
                    settings=settings,
                    cancel=cancel,
                    emit=emit,
                    what=model.display,
                ).run()
                fetched.append(digest)
            emit({"status": "verifying sha256 digest"})
            mismatch: DigestMismatch | None = None
            for digest in fetched:
                try:
                    commit_blob(store, digest, model.display)
                except DigestMismatch as exc:  # the good blobs are still kept
                    mismatch = mismatch or exc
            if mismatch is not None:
                raise mismatch
    check_gguf_layers(store, model, manifest.layers, fetched)
    emit({"status": "writing manifest"})
    store.write_manifest(model, manifest)
    emit({"status": "success"})


def _fetch_manifest(registry: _Registry, model: ModelName) -> bytes:
    url = registry.url("manifests", model.tag)
    attempt = 0
    while True:
        check_cancel(registry.cancel, model.display)
        headers = {"Accept": _ACCEPT_MANIFEST, **registry.headers_for(url)}
        try:
            response = registry.client.get(url, headers=headers, follow_redirects=True)
        except httpx.TransportError as exc:
            reason = f"cannot reach {registry.base}: {describe_error(exc)}"
        else:
            status = response.status_code
            if status == 200:
                return response.content
            if status == 404:
                raise ModelNotFound(
                    f"model '{model.display}' not found in the registry {model.host}: check the name and the tag"
                    f" ('{model.tag}')",
                    model=model.display,
                )
            if status == 401 and registry.authenticate(response):
                continue
            if status in (401, 403):
                raise PullError(
                    f"the registry {model.host} refused access to '{model.display}' (HTTP {status}):"
                    " the model may be private, or the registry needs credentials"
                )
            if status < 500 and status != 429:
                raise PullError(
                    f"pulling the manifest of '{model.display}' failed: HTTP {status} {_body_hint(response)}"
                )
            reason = f"the registry {model.host} answered HTTP {status}"
        attempt += 1
        if attempt > registry.settings.max_retries:
            raise PullError(f"pulling the manifest of '{model.display}' failed: {reason}")
        log.info("manifest request failed (%s); retrying", reason)
        sleep_backoff(registry.settings, attempt, registry.cancel, model.display)


def _parse_manifest(raw: bytes, model: ModelName) -> Manifest:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise PullError(f"the registry sent a manifest for '{model.display}' that is not JSON") from None
    if isinstance(obj, dict) and obj.get("mediaType") in _LIST_MEDIA_TYPES:
        raise PullError(f"'{model.display}' is a multi-platform image index, not a model")
    try:
        manifest = Manifest.from_json(raw)
    except LocalLLMError as exc:
        raise PullError(f"the registry sent a malformed manifest for '{model.display}': {exc}") from None
    for layer in (*manifest.layers, manifest.config):
        if not DIGEST_RE.fullmatch(layer.digest):
            raise PullError(f"the manifest of '{model.display}' names a bad digest {layer.digest!r}")
    if not manifest.layers:
        raise PullError(f"the manifest of '{model.display}' lists no layers")
    return manifest


def _body_hint(response: httpx.Response) -> str:
    try:
        text = response.text.strip()
    except (UnicodeDecodeError, httpx.HTTPError):
        return ""
    return f"({text[:200]})" if text else ""
