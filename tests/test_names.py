"""Model names: Ollama's parsing rules, defaults, display form, case folding and path safety."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from localllm.errors import InvalidModelName
from localllm.registry.names import ModelName, is_valid_name

pytestmark = pytest.mark.fast

VALID = [
    ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest"), "smollm2:latest"),
    ("smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m"), "smollm2:135m"),
    ("llama3.2:3b-instruct-q4_K_M", ("registry.ollama.ai", "library", "llama3.2", "3b-instruct-q4_K_M"), None),
    ("library/smollm2", ("registry.ollama.ai", "library", "smollm2", "latest"), "smollm2:latest"),
    ("jmorgan/mixtral:v2", ("registry.ollama.ai", "jmorgan", "mixtral", "v2"), "jmorgan/mixtral:v2"),
    (
        "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
        ("hf.co", "bartowski", "SmolLM2-135M-Instruct-GGUF", "Q4_K_M"),
        "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
    ),
    ("hf.co/owner/repo", ("hf.co", "owner", "repo", "latest"), "hf.co/owner/repo:latest"),
    ("localhost:5000/ns/model", ("localhost:5000", "ns", "model", "latest"), "localhost:5000/ns/model:latest"),
    ("127.0.0.1:8080/ns/m:t", ("127.0.0.1:8080", "ns", "m", "t"), "127.0.0.1:8080/ns/m:t"),
    ("registry.ollama.ai/library/x:y", ("registry.ollama.ai", "library", "x", "y"), "x:y"),
    ("REGISTRY.OLLAMA.AI/Library/X", ("REGISTRY.OLLAMA.AI", "Library", "X", "latest"), "X:latest"),
    ("_private", ("registry.ollama.ai", "library", "_private", "latest"), "_private:latest"),
    ("a" * 80, ("registry.ollama.ai", "library", "a" * 80, "latest"), None),
    ("m:" + "t" * 80, ("registry.ollama.ai", "library", "m", "t" * 80), None),
]


@pytest.mark.parametrize(("text", "parts", "display"), VALID)
def test_valid_names(text: str, parts: tuple[str, str, str, str], display: str | None) -> None:
    name = ModelName.parse(text)
    assert name.parts == parts
    if display is not None:
        assert name.display == display
    assert ModelName.parse(str(name)) == name
    assert ModelName.parse(name.display) == name
    assert is_valid_name(text)


INVALID = [
    ("", "empty"),
    (":tag", "model part is empty"),
    ("model:", "tag part is empty"),
    ("/model", "namespace part is empty"),
    ("ns//model", "namespace part is empty"),
    ("a/b/c/d", "too many"),
    ("my model", "a space"),
    ("-model", "must start with"),
    (".hidden", "must start with"),
    ("model:-tag", "must start with"),
    ("na.me/model", "namespace part"),
    ("model:ta:g", "the model part 'model:ta' contains ':'"),
    ("model@sha256:abcd", "digests"),
    ("a" * 81, "at most 80"),
    ("m:" + "t" * 81, "at most 80"),
    ("..", "must start with"),
    ("../../etc/passwd", "too many"),
    ("../passwd", "must start with"),
    ("model\\x", "backslash"),
    ("mo\x00del", "NUL"),
    ("ftp://host/ns/m", "scheme"),
    ("ns/mo$del", "'$'"),
]


@pytest.mark.parametrize(("text", "rule"), INVALID)
def test_invalid_names_say_which_rule(text: str, rule: str) -> None:
    with pytest.raises(InvalidModelName) as info:
        ModelName.parse(text)
    message = str(info.value)
    assert rule in message, message
    assert not is_valid_name(text)


def test_scheme_is_kept_but_not_compared() -> None:
    plain = ModelName.parse("127.0.0.1:9999/ns/m:t")
    insecure = ModelName.parse("http://127.0.0.1:9999/ns/m:t")
    assert insecure.scheme == "http"
    assert plain.scheme == "https"
    assert plain == insecure
    assert insecure.host == "127.0.0.1:9999"


def test_case_insensitive_equality_and_hash() -> None:
    a = ModelName.parse("SmolLM2:Latest")
    b = ModelName.parse("smollm2")
    assert a == b
    assert hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert a.model == "SmolLM2"  # spelling is kept
    assert a != ModelName.parse("smollm2:other")


def test_with_spelling_only_accepts_respellings() -> None:
    name = ModelName.parse("abc:def")
    respelled = name.with_spelling(("registry.ollama.ai", "library", "ABC", "Def"))
    assert respelled.display == "ABC:Def"
    with pytest.raises(ValueError):
        name.with_spelling(("registry.ollama.ai", "library", "abd", "def"))


def test_manifest_relpath() -> None:
    assert ModelName.parse("hf.co/o/r:Q4").manifest_relpath == Path("hf.co", "o", "r", "Q4")
    assert ModelName.parse("x").manifest_relpath == Path("registry.ollama.ai", "library", "x", "latest")


def test_from_parts_validates() -> None:
    assert ModelName.from_parts("h", "n", "m", "t").display == "h/n/m:t"
    with pytest.raises(InvalidModelName):
        ModelName.from_parts("h", "..", "m", "t")


_DANGEROUS = ["..", ".", "/", "\\", "\x00", ":", "~", "a", "Z", "0", "_", "-", " ", "\n", "%2e", "C:", "@", "\u2215"]


def test_no_name_escapes_the_store(tmp_path: Path) -> None:
    """Random strings built from path-ish pieces either fail to parse or stay inside manifests/."""
    rng = random.Random(1234)
    root = (tmp_path / "manifests").resolve()
    accepted = 0
    for _ in range(3000):
        text = "".join(rng.choice(_DANGEROUS) for _ in range(rng.randint(1, 8)))
        try:
            name = ModelName.parse(text)
        except InvalidModelName:
            continue
        accepted += 1
        rel = name.manifest_relpath
        assert not rel.is_absolute()
        assert len(rel.parts) == 4
        for part in rel.parts:
            assert part not in ("", ".", "..")
            assert "/" not in part and "\\" not in part and "\x00" not in part and os.sep not in part
        target = (root / rel).resolve()
        assert root in target.parents
    assert accepted > 50  # the generator does produce valid names too


@pytest.mark.parametrize("text", ["../x", "x/../../y", "/etc/passwd", "C:\\x", "\\\\server\\share", "a/./b"])
def test_path_like_strings_are_rejected(text: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(text)


def test_the_rules_are_public() -> None:
    """Front doors and applications read names, keep_alive and Modelfiles as the engine does, from `localllm`."""
    import localllm

    assert localllm.ModelName.parse("SmolLM2").display == "SmolLM2:latest"
    assert localllm.ModelName.parse("smollm2") == localllm.ModelName.parse("SMOLLM2:latest")
    assert localllm.parse_keep_alive("1h30m", 300.0) == 5400.0
    assert localllm.parse_keep_alive(None, 300.0) == 300.0
    built = localllm.Modelfile.build(from_="smollm2", system="hi")
    assert localllm.parse_modelfile("FROM smollm2\nSYSTEM hi\n") == built
