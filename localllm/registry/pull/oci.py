"""Pulling from an OCI (docker v2) registry, as Ollama does.

The manifest comes from ``/v2/<namespace>/<model>/manifests/<tag>``, then
every blob it lists from ``/v2/<namespace>/<model>/blobs/<digest>``; an
anonymous Bearer token is fetched when the registry asks for one. A registry
that cannot be reached fails the pull at once (`RegistryUnreachable`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

import attrs
import httpx

from ...errors import DigestMismatch, LocalLLMError, ModelNotFound, PullError
from ..names import ModelName
from ..store import MEDIA_MANIFEST, BlobStore, Layer, Manifest
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
from .retry import Origin, Retries, retry_after_seconds, wait_to_retry

__all__ = ["pull_oci"]

log = logging.getLogger("localllm.registry.pull")

_ACCEPT_MANIFEST = ", ".join((MEDIA_MANIFEST, "application/vnd.oci.image.manifest.v1+json"))
_LIST_MEDIA_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)


@attrs.define
class _Registry:
    """Where a model's manifest and blobs live, and how to authenticate there."""

    client: httpx.Client
    base: str  # scheme://host
    repository: str  # namespace/model
    settings: PullSettings
    cancel: threading.Event | None
    what: str  # the model's name, for errors
    headers: dict[str, str] = attrs.Factory(dict)  # sent to the registry's own host only
    token_tried: bool = False

    @property
    def origin(self) -> Origin:
        return Origin(label="the registry", url=self.base, hint="the host in the model name")

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
            self.origin.check(exc, self.what, realm)  # the token service may live on a host of its own
            log.info("could not get a registry token from %s: %s", realm, exc)
            return False
        if not token:
            return False
        self.headers["Authorization"] = f"Bearer {token}"
        return True


def _registry_base(model: ModelName, insecure: bool) -> str:
    host = model.host
    local = loopback_with_port(host)
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
    with http_client(settings, insecure=insecure) as client:
        registry = _Registry(
            client=client,
            base=_registry_base(model, insecure),
            repository=f"{model.namespace}/{model.model}",
            settings=settings,
            cancel=cancel,
            what=model.display,
        )
        manifest = _parse_manifest(_fetch_manifest(registry, model), model)
        layers = (*manifest.layers, manifest.config)
        commit_pull(
            store,
            model,
            fetch=lambda: (layers, _fetch_blobs(store, registry, layers, model, emit)),
            build=lambda _layers: manifest,
            emit=emit,
        )


def _fetch_blobs(
    store: BlobStore, registry: _Registry, layers: Sequence[Layer], model: ModelName, emit: Progress
) -> list[str]:
    """Download every blob of `layers` the store lacks (or holds damaged); return the digests downloaded."""
    blobs: dict[str, int] = {}
    for layer in layers:
        blobs.setdefault(layer.digest, layer.size)
    missing = {d for d in blobs if not store.has_blob(d)}
    fetched: list[str] = []
    with holding(store, sorted(missing), registry.cancel, model.display):
        for digest, size in blobs.items():
            check_cancel(registry.cancel, model.display)
            if digest not in missing or store.has_blob(digest):  # (another pull may have brought it meanwhile)
                emit({"status": f"pulling {short_digest(digest)}", "digest": digest, "total": size, "completed": size})
                continue
            BlobDownload(
                client=registry.client,
                store=store,
                digest=digest,
                size=size,
                url=registry.url("blobs", digest),
                headers_for=registry.headers_for,
                settings=registry.settings,
                cancel=registry.cancel,
                emit=emit,
                what=model.display,
                origin=registry.origin,
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
    return fetched


def _fetch_manifest(registry: _Registry, model: ModelName) -> bytes:
    url = registry.url("manifests", model.tag)
    retries = Retries(registry.settings)
    while True:
        check_cancel(registry.cancel, model.display)
        headers = {"Accept": _ACCEPT_MANIFEST, **registry.headers_for(url)}
        after = None
        try:
            response = registry.client.get(url, headers=headers, follow_redirects=True)
        except httpx.TransportError as exc:
            registry.origin.check(exc, model.display, url)
            reason = f"cannot reach {registry.base}: {describe_error(exc)}"
        else:
            status = response.status_code
            answer = describe_status(status, response.url)
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
                    f"the registry {model.host} refused access to '{model.display}' ({answer}):"
                    " the model may be private, or the registry needs credentials"
                )
            if status < 500 and status != 429:  # no retry changes what the registry answers to this request
                raise PullError(f"pulling the manifest of '{model.display}' failed: {answer}")
            reason, after = answer, retry_after_seconds(response.headers)
        delay = retries.delay(after)
        if delay is None:
            raise PullError(f"pulling the manifest of '{model.display}' failed: {reason}; {retries.gave_up()}")
        log.info("manifest request failed (%s); retrying", reason)
        wait_to_retry(delay, registry.cancel, model.display)


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
