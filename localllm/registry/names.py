"""Model names: ``[host/][namespace/]model[:tag]``, with Ollama's rules and defaults.

A name has four parts. Missing parts take the defaults ``registry.ollama.ai``,
``library`` and ``latest``. Each part is limited to ASCII letters, digits and a
few punctuation characters, and must begin with a letter, digit or ``_``, so no
valid name can spell ``..``, an absolute path, a backslash or a NUL: the
manifest path of a name always stays inside the store.

Names compare case-insensitively (``SmolLM2`` and ``smollm2`` are one model);
the store keeps the spelling under which a model was first written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from ..errors import InvalidModelName

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TAG",
    "ModelName",
    "is_valid_name",
]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_SCHEME = "https"

_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
# part -> (extra characters allowed after the first, maximum length)
_RULES: dict[str, tuple[frozenset[str], int]] = {
    "host": (frozenset("-_.:"), 350),
    "namespace": (frozenset("-_"), 80),
    "model": (frozenset("-_."), 80),
    "tag": (frozenset("-_."), 80),
}


def _describe(char: str) -> str:
    if char == " ":
        return "a space"
    if char == "\x00":
        return "a NUL byte"
    if char == "\\":
        return "a backslash"
    if not char.isprintable():
        return f"the control character {char!r}"
    return f"{char!r}"


def _check_part(kind: str, value: str, text: str) -> None:
    extra, limit = _RULES[kind]
    if not value:
        raise InvalidModelName(f"invalid model name {text!r}: the {kind} part is empty")
    if len(value) > limit:
        raise InvalidModelName(
            f"invalid model name {text!r}: the {kind} part is {len(value)} characters long; at most {limit} are allowed"
        )
    if value[0] not in _WORD:
        raise InvalidModelName(
            f"invalid model name {text!r}: the {kind} part {value!r} must start with a letter, digit or '_'"
            f" (it starts with {_describe(value[0])})"
        )
    for char in value[1:]:
        if char not in _WORD and char not in extra:
            allowed = ", ".join(repr(c) for c in sorted(extra))
            raise InvalidModelName(
                f"invalid model name {text!r}: the {kind} part {value!r} contains {_describe(char)};"
                f" only letters, digits and {allowed} are allowed"
            )


def _split(text: str) -> tuple[str, str | None, str | None, str | None, str | None]:
    """Split into (model, tag, namespace, host, scheme) the way Ollama does; parts may be empty."""
    rest = text
    tag: str | None = None
    if rest.rfind(":") > rest.rfind("/"):
        rest, _, tag = rest.rpartition(":")
    if "/" not in rest:
        return rest, tag, None, None, None
    rest, _, model = rest.rpartition("/")
    if "/" not in rest:
        return model, tag, rest, None, None
    scheme: str | None = None
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
    rest, _, namespace = rest.rpartition("/")
    return model, tag, namespace, rest, scheme


def _fold(value: str) -> str:
    return value.lower()


@attrs.frozen(eq=False)
class ModelName:
    """A fully qualified model name. Equality and hashing ignore case (and the scheme)."""

    host: str
    namespace: str
    model: str
    tag: str
    #: ``https`` unless the name was written with an explicit ``http://`` (a local registry).
    scheme: str = DEFAULT_SCHEME

    @classmethod
    def parse(cls, text: str | ModelName) -> ModelName:
        """Parse ``[scheme://][host/][namespace/]model[:tag]``; raise InvalidModelName naming the broken rule."""
        if isinstance(text, ModelName):
            return text
        if not isinstance(text, str):
            raise InvalidModelName(f"a model name must be a string, got {type(text).__name__}")
        if not text:
            raise InvalidModelName("invalid model name '': a model name cannot be empty")
        if "@" in text:
            raise InvalidModelName(f"invalid model name {text!r}: digests ('@sha256:...') are not accepted in names")
        model, tag, namespace, host, scheme = _split(text)
        if host is not None and "/" in host:
            raise InvalidModelName(
                f"invalid model name {text!r}: too many '/'-separated parts; the form is [host/][namespace/]model[:tag]"
            )
        if scheme is not None and scheme.lower() not in ("http", "https"):
            raise InvalidModelName(f"invalid model name {text!r}: the scheme must be http or https, not {scheme!r}")
        for kind, value in (("host", host), ("namespace", namespace), ("model", model), ("tag", tag)):
            if value is not None:
                _check_part(kind, value, text)
        return cls(
            host=host if host is not None else DEFAULT_HOST,
            namespace=namespace if namespace is not None else DEFAULT_NAMESPACE,
            model=model,
            tag=tag if tag is not None else DEFAULT_TAG,
            scheme=scheme.lower() if scheme is not None else DEFAULT_SCHEME,
        )

    @classmethod
    def from_parts(cls, host: str, namespace: str, model: str, tag: str) -> ModelName:
        """Build a name from its four parts (e.g. a manifest path), validating each."""
        text = f"{host}/{namespace}/{model}:{tag}"
        for kind, value in (("host", host), ("namespace", namespace), ("model", model), ("tag", tag)):
            _check_part(kind, value, text)
        return cls(host=host, namespace=namespace, model=model, tag=tag)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The case-folded parts: two names are the same model when their keys are equal."""
        return (_fold(self.host), _fold(self.namespace), _fold(self.model), _fold(self.tag))

    @property
    def display(self) -> str:
        """The shortest form, as Ollama shows it: ``smollm2:latest``, ``hf.co/owner/repo:Q4_K_M``."""
        if _fold(self.host) != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if _fold(self.namespace) != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def manifest_relpath(self) -> Path:
        """``host/namespace/model/tag``, relative to the store's ``manifests`` folder."""
        return Path(self.host, self.namespace, self.model, self.tag)

    def with_spelling(self, parts: tuple[str, str, str, str]) -> ModelName:
        """The same name spelled with `parts` (which must be equal ignoring case)."""
        if tuple(_fold(p) for p in parts) != self.key:
            raise ValueError(f"{parts!r} is not a respelling of {self}")
        return attrs.evolve(self, host=parts[0], namespace=parts[1], model=parts[2], tag=parts[3])

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, ModelName):
            return NotImplemented
        return self.key == other.key

    def __ne__(self, other: Any) -> bool:
        if not isinstance(other, ModelName):
            return NotImplemented
        return self.key != other.key

    def __hash__(self) -> int:
        return hash(self.key)


def is_valid_name(text: str) -> bool:
    """Whether `text` parses as a model name."""
    try:
        ModelName.parse(text)
    except InvalidModelName:
        return False
    return True
