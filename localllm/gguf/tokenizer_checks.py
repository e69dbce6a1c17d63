"""The semantic checks on a parsed GGUF file's tokenizer: the vocabulary, its byte tokens, special token ids.

llama.cpp asserts on a vocabulary that repeats a token, on a byte-fallback vocabulary that lacks a byte, and
on a token its tokenizer adds to every prompt but the vocabulary lacks. The vocabulary is scanned once, in
place in the file, with one 8-byte hash per token to find duplicates.
"""

from __future__ import annotations

import array
import re

import attrs
import numpy as np

from localllm.gguf.metadata_checks import array_value, fail, int_value, string_value
from localllm.gguf.structure import (
    HINT_TOKENIZER,
    T_ARRAY,
    T_BOOL,
    T_FLOAT32,
    T_INT8,
    T_INT32,
    T_STRING,
    T_UINT8,
    ParsedGGUF,
    StringArray,
    describe_type,
    show_bytes,
)

__all__ = ["check_added_tokens", "check_tokenizer"]

# token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_BYTE = 6
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>\Z")
_UPPER_BYTE_TOKEN = re.compile(rb"<0x[0-9A-F]{2}>\Z")  # the spelling llama.cpp's byte fallback looks up
_EMPTY_NAME = re.compile(rb"\[EMPTY_(0|[1-9][0-9]*)\]\Z")  # llama.cpp's name for empty token i
# Hashes repeated in a vocabulary are confirmed against the tokens themselves this many at a time. hash() of
# bytes is keyed per process (SipHash), so in practice every repeated hash is a real duplicate and one pass
# finds it.
_SUSPECTS_PER_PASS = 1024
_SPECIAL_ID_KEY = re.compile(r"tokenizer\.ggml\.\w+_token_id\Z")


def _cut_at_nul(token: bytes) -> bytes:
    """A token string as llama.cpp reads it: a C string, ending at the first NUL."""
    return token[: token.index(0)] if 0 in token else token  # (an int: no bytes needle to convert)


@attrs.frozen
class _ByteTokens:
    """Which bytes a vocabulary can spell on their own: as <0xNN> (upper-case hex) or as the raw byte."""

    hex: frozenset[int]
    raw: frozenset[int]


def _scan_vocabulary(parsed: ParsedGGUF, tokens: StringArray, byte_typed: bytes | None) -> _ByteTokens:
    """One pass over the vocabulary: the form of byte tokens, the byte tokens there are, and uniqueness.

    `byte_typed[i]` is 1 where token i has the byte type and must read <0xNN>. llama.cpp keys its vocabulary by
    token string, naming an empty token i "[EMPTY_i]"; a string that appears twice trips its assert that every
    id has its own key. Uniqueness is checked on one 64-bit hash per non-empty token (8 bytes, however long the
    token) and one byte per empty one, never on a set of the tokens themselves.
    """
    hashes = array.array("q")
    empty = bytearray(len(tokens))
    hex_bytes: set[int] = set()
    raw_bytes: set[int] = set()
    names_like_empty = False
    for index, token in enumerate(tokens):
        if 0 in token:  # (_cut_at_nul, inlined: this loop runs once per token)
            token = token[: token.index(0)]
        if not token:
            empty[index] = 1  # "[EMPTY_<index>]": unlike any other empty one
            if byte_typed is not None and byte_typed[index]:
                fail(parsed, f"byte token {index} is empty, not of the form <0xNN>", HINT_TOKENIZER)
            continue
        hashes.append(hash(token))
        if len(token) == 1:
            raw_bytes.add(token[0])
        elif len(token) == 6 and _UPPER_BYTE_TOKEN.match(token):
            hex_bytes.add(int(token[3:5], 16))
        elif token.startswith(b"[EMPTY_"):
            names_like_empty = True
        if byte_typed is not None and byte_typed[index] and not _BYTE_TOKEN.match(token):
            fail(parsed, f"byte token {index} is {show_bytes(token)}, not of the form <0xNN>", HINT_TOKENIZER)

    sorted_hashes = np.frombuffer(hashes, dtype=np.int64)
    sorted_hashes.sort()
    repeated = np.unique(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]])
    del sorted_hashes
    for batch in range(0, len(repeated), _SUSPECTS_PER_PASS):
        _find_duplicate(parsed, tokens, frozenset(repeated[batch : batch + _SUSPECTS_PER_PASS].tolist()))
    if names_like_empty:
        _find_spelled_empty_name(parsed, tokens, empty)
    return _ByteTokens(frozenset(hex_bytes), frozenset(raw_bytes))


def _find_duplicate(parsed: ParsedGGUF, tokens: StringArray, suspects: frozenset[int]) -> None:
    """Fail on the first token that repeats an earlier one, among the tokens whose hash is a suspect."""
    first: dict[bytes, int] = {}
    for index, token in enumerate(tokens):
        token = _cut_at_nul(token)
        if token and hash(token) in suspects:
            seen = first.setdefault(token, index)
            if seen != index:
                fail(
                    parsed,
                    f"the vocabulary has the token {show_bytes(token)} twice (ids {seen} and {index})",
                    HINT_TOKENIZER,
                )


def _find_spelled_empty_name(parsed: ParsedGGUF, tokens: StringArray, empty: bytearray) -> None:
    """Fail on a token spelled "[EMPTY_i]" where token i is empty: llama.cpp gives both that name."""
    for index, token in enumerate(tokens):
        match = _EMPTY_NAME.match(_cut_at_nul(token))
        if match is not None and int(match[1]) < len(empty) and empty[int(match[1])]:
            ids = sorted((index, int(match[1])))
            fail(
                parsed,
                f"the vocabulary has the token {show_bytes(match[0])} twice (ids {ids[0]} and {ids[1]})",
                HINT_TOKENIZER,
            )


@attrs.frozen
class _AddedToken:
    """A special token llama.cpp's tokenizer puts into every prompt (llama-vocab.cpp's defaults)."""

    name: str  # "bos", "eos", "sep"
    id_key: str
    default_id: int | None  # the id llama.cpp falls back to when the file names none
    added: bool  # whether it is added when tokenizer.ggml.add_<name>_token does not say
    always: bool = False  # added whatever that flag says


_BOS, _EOS, _SEP = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.seperator_token_id"
_ADDED_TOKENS: dict[str, tuple[_AddedToken, ...]] = {
    "llama": (_AddedToken("bos", _BOS, 1, added=True), _AddedToken("eos", _EOS, 2, added=False)),
    "t5": (_AddedToken("bos", _BOS, None, added=False), _AddedToken("eos", _EOS, 1, added=True)),
    "gpt2": (_AddedToken("bos", _BOS, 11, added=False), _AddedToken("eos", _EOS, 11, added=False)),
    "bert": (
        _AddedToken("bos", _BOS, 101, added=True, always=True),
        _AddedToken("sep", _SEP, 102, added=True, always=True),
    ),
}


def check_added_tokens(parsed: ParsedGGUF, model: str | None, n_vocab: int) -> None:
    """A token the tokenizer adds to every prompt must exist: llama.cpp asserts it does when it tokenizes."""
    for token in _ADDED_TOKENS.get(model or "", ()):
        if token.id_key in parsed.kv:  # range-checked with the other special token ids
            continue
        if token.default_id is not None and token.default_id < n_vocab:
            continue
        flag_key = f"tokenizer.ggml.add_{token.name}_token"
        flag = parsed.kv.get(flag_key)
        if flag is not None and flag.type != T_BOOL:
            fail(parsed, f"metadata key '{flag_key}' must be a bool, but is a {describe_type(flag)}", HINT_TOKENIZER)
        if token.always or (flag.value if flag is not None else token.added):
            default = "none" if token.default_id is None else f"{token.default_id}, outside the vocabulary"
            fail(
                parsed,
                f"the '{model}' tokenizer adds a {token.name.upper()} token to every prompt, but {token.id_key} is "
                f"missing and its default id is {default} of {n_vocab} tokens",
                HINT_TOKENIZER,
            )


def check_tokenizer(parsed: ParsedGGUF) -> None:
    hint = HINT_TOKENIZER
    model_raw = string_value(parsed, "tokenizer.ggml.model", hint)
    model = model_raw.decode("utf-8", "replace") if model_raw is not None else None
    tokens: StringArray | None = array_value(parsed, "tokenizer.ggml.tokens", T_STRING, hint)
    if tokens is None:
        if model is not None and model not in ("none", "no_vocab"):
            fail(
                parsed, f"tokenizer.ggml.model is '{model}' but the vocabulary (tokenizer.ggml.tokens) is missing", hint
            )
        return
    n_vocab = len(tokens)
    if n_vocab == 0:
        fail(parsed, "the vocabulary (tokenizer.ggml.tokens) is empty", hint)
    if n_vocab >= 1 << 31:
        fail(parsed, f"the vocabulary has {n_vocab} tokens, more than llama.cpp's 32-bit token ids allow", hint)

    scores = array_value(parsed, "tokenizer.ggml.scores", T_FLOAT32, hint)
    if scores is not None and len(scores) != n_vocab:
        fail(parsed, f"tokenizer.ggml.scores has {len(scores)} entries but tokenizer.ggml.tokens has {n_vocab}", hint)
    token_types = array_value(parsed, "tokenizer.ggml.token_type", T_INT32, hint)
    if token_types is not None and len(token_types) != n_vocab:
        fail(
            parsed,
            f"tokenizer.ggml.token_type has {len(token_types)} entries but tokenizer.ggml.tokens has {n_vocab}",
            hint,
        )
    array_value(parsed, "tokenizer.ggml.merges", T_STRING, hint)

    byte_typed: bytes | None = None
    if token_types is not None:
        is_byte = token_types == TOKEN_TYPE_BYTE
        if model == "bert" and is_byte.any():
            index = int(np.argmax(is_byte))
            fail(
                parsed,
                f"token {index} ({show_bytes(_cut_at_nul(tokens[index]))}) has the byte type, which a 'bert' "
                f"(WordPiece) vocabulary cannot have",
                hint,
            )
        if model in ("llama", "t5"):
            byte_typed = is_byte.tobytes()
    byte_tokens = _scan_vocabulary(parsed, tokens, byte_typed)

    for key in sorted(k for k in parsed.kv if _SPECIAL_ID_KEY.match(k)):
        value = int_value(parsed, key, hint)
        if value is not None and not 0 <= value < n_vocab:
            fail(parsed, f"{key} is {value}, outside the vocabulary of {n_vocab} tokens", hint)

    if model == "llama" and byte_tokens.hex:
        # A byte-fallback vocabulary: llama.cpp looks each byte up (as <0xNN>, else the raw byte) when text has
        # no better token, and a failed lookup there aborts the process.
        missing = [c for c in range(256) if c not in byte_tokens.hex and c not in byte_tokens.raw]
        if missing:
            fail(
                parsed,
                f"the byte-fallback vocabulary lacks the byte token <0x{missing[0]:02X}> "
                f"({len(missing)} of 256 byte tokens are missing)",
                hint,
            )
    check_added_tokens(parsed, model, n_vocab)

    charsmap = parsed.kv.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap is not None:
        if charsmap.type != T_ARRAY or charsmap.element_type not in (T_UINT8, T_INT8):
            fail(
                parsed,
                f"tokenizer.ggml.precompiled_charsmap must be an array of bytes, but is a {describe_type(charsmap)}",
                hint,
            )
        blob = charsmap.value
        if len(blob) and (len(blob) < 4 or int.from_bytes(blob[:4].tobytes(), "little") + 4 >= len(blob)):
            fail(parsed, "tokenizer.ggml.precompiled_charsmap is shorter than the size it declares", hint)
