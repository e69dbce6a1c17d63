"""Modelfiles: Ollama's recipe format for building a model.

::

    # comments start a line with '#'
    FROM ./SmolLM2-135M-Instruct.Q4_1.gguf      # a GGUF file, or an existing model's name
    PARAMETER temperature 0.7
    PARAMETER stop "<|im_end|>"                 # repeated 'stop' lines accumulate
    TEMPLATE \"\"\"{{ .System }} {{ .Prompt }}\"\"\"  # triple quotes span lines
    SYSTEM "You are terse."
    ADAPTER ./lora.gguf
    LICENSE "Apache-2.0"
    MESSAGE user Hello
    MESSAGE assistant Hi!
    REQUIRES 0.5.0

Instructions are case-insensitive. A value is the rest of its line; a value
wrapped in ``"`` or ``\"\"\"`` keeps surrounding spaces and may continue over
several lines until a line ends with the closing quote(s). Every error names
the line it was found on.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ..errors import InvalidOptions, ModelfileError
from ..options import OPTION_TYPES, parse_option_value

__all__ = ["INSTRUCTIONS", "MESSAGE_ROLES", "Instruction", "Modelfile", "format_value", "parse"]

#: The instructions a Modelfile may use, in the order `Modelfile.format` of a built file writes them.
INSTRUCTIONS = (
    "from",
    "adapter",
    "template",
    "system",
    "renderer",
    "parser",
    "parameter",
    "license",
    "message",
    "requires",
)
MESSAGE_ROLES = ("system", "user", "assistant")
#: Parameters Ollama once accepted and now ignores with a warning.
DEPRECATED_PARAMETERS = frozenset(
    {"mirostat", "mirostat_tau", "mirostat_eta", "f16_kv", "logits_all", "vocab_only", "tfs_z", "num_gqa"}
)

_INSTRUCTION_RE = re.compile(r"([A-Za-z]+)(?:[ \t]+(.*))?", re.DOTALL)
_PARAMETER_RE = re.compile(r"([A-Za-z0-9_]+)[ \t]+(.*)", re.DOTALL)
_MESSAGE_RE = re.compile(r"([A-Za-z]+)[ \t]+(.*)", re.DOTALL)
_SEMVER_RE = re.compile(r"v?(\d+)(\.\d+){0,2}(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")


def _error(line: int, message: str) -> ModelfileError:
    exc = ModelfileError(f"Modelfile line {line}: {message}" if line > 0 else f"Modelfile: {message}")
    exc.line = line  # type: ignore[attr-defined]
    return exc


@attrs.frozen
class Instruction:
    """One instruction: ``name`` is lowercase; ``key`` is the parameter name or message role."""

    name: str
    value: str
    key: str | None = None
    line: int = attrs.field(default=0, eq=False)

    def format(self) -> str:
        if self.name == "parameter":
            return f"PARAMETER {self.key} {format_value(self.value)}"
        if self.name == "message":
            return f"MESSAGE {self.key} {format_value(self.value)}"
        return f"{self.name.upper()} {format_value(self.value)}"


# --------------------------------------------------------------------------- values


def _unquote(text: str) -> tuple[bool, str]:
    """Ollama's rule: a complete value is unquoted, or wrapped in matching ``\"\"\"`` or ``"``."""
    if text.startswith('"""'):
        if len(text) >= 6 and text.endswith('"""'):
            return True, text[3:-3]
        return False, ""
    if text.startswith('"'):
        if len(text) >= 2 and text.endswith('"'):
            return True, text[1:-1]
        return False, ""
    return True, text


def _read_value(first: str, lines: list[str], index: int) -> tuple[str, int] | None:
    """Read a value starting with `first` (the rest of line `index`); return it and the next line's index.

    None means the value is an unterminated quote.
    """
    buffer = first
    j = index
    while True:
        complete, value = _unquote(buffer.strip())
        if complete:
            return value, j + 1
        j += 1
        if j >= len(lines):
            return None
        buffer = buffer + "\n" + lines[j]


def format_value(value: str) -> str:
    """`value` as a Modelfile writes it: bare when that reads back the same, else quoted."""
    plain = (
        value != "" and value == value.strip() and "\n" not in value and "\r" not in value and not value.startswith('"')
    )
    if plain:
        return value
    candidates = [f'"{value}"', f'"""{value}"""'] if '"' not in value else [f'"""{value}"""', f'"{value}"']
    for candidate in candidates:
        lines = candidate.split("\n")
        if _read_value(lines[0], lines, 0) == (value, len(lines)):
            return candidate
    raise ModelfileError(f"the value {value!r} cannot be written in a Modelfile (it has lines ending in quotes)")


# --------------------------------------------------------------------------- the Modelfile


def _instruction_tuple(items: Iterable[Instruction]) -> tuple[Instruction, ...]:
    return tuple(items)


@attrs.frozen
class Modelfile:
    """A parsed Modelfile: its instructions in order, with typed views of them."""

    instructions: tuple[Instruction, ...] = attrs.field(default=(), converter=_instruction_tuple)

    def _values(self, name: str) -> tuple[str, ...]:
        return tuple(i.value for i in self.instructions if i.name == name)

    def _last(self, name: str) -> str | None:
        values = self._values(name)
        return values[-1] if values else None

    @property
    def from_(self) -> str | None:
        """The first FROM: a file path or a model name."""
        froms = self.froms
        return froms[0] if froms else None

    @property
    def froms(self) -> tuple[str, ...]:
        """Every FROM, in order (a model, then e.g. a vision projector)."""
        return self._values("from")

    @property
    def from_line(self) -> int:
        for instruction in self.instructions:
            if instruction.name == "from":
                return instruction.line
        return 0

    @property
    def parameters(self) -> dict[str, Any]:
        """PARAMETER values, typed; ``stop`` is a list of every stop given; a later value wins otherwise."""
        params: dict[str, Any] = {}
        for instruction in self.instructions:
            if instruction.name != "parameter" or instruction.key is None:
                continue
            value = parse_option_value(instruction.key, instruction.value)
            if instruction.key == "stop":
                params.setdefault("stop", []).extend(value)
            else:
                params[instruction.key] = value
        return params

    @property
    def template(self) -> str | None:
        return self._last("template")

    @property
    def system(self) -> str | None:
        return self._last("system")

    @property
    def adapters(self) -> tuple[str, ...]:
        return self._values("adapter")

    @property
    def licenses(self) -> tuple[str, ...]:
        return self._values("license")

    @property
    def messages(self) -> tuple[dict[str, str], ...]:
        return tuple({"role": i.key or "", "content": i.value} for i in self.instructions if i.name == "message")

    @property
    def requires(self) -> str | None:
        return self._last("requires")

    @property
    def renderer(self) -> str | None:
        return self._last("renderer")

    @property
    def parser(self) -> str | None:
        return self._last("parser")

    def format(self) -> str:
        """The Modelfile as text; `parse` reads it back to an equal Modelfile."""
        return "".join(instruction.format() + "\n" for instruction in self.instructions)

    @classmethod
    def build(
        cls,
        *,
        from_: str | Iterable[str] | None = None,
        adapters: Iterable[str] = (),
        template: str | None = None,
        system: str | None = None,
        renderer: str | None = None,
        parser: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        licenses: Iterable[str] = (),
        messages: Iterable[Mapping[str, str]] = (),
        requires: str | None = None,
    ) -> Modelfile:
        """Assemble a Modelfile from parts (parameter values may be typed; lists give one line each)."""
        out: list[Instruction] = []
        froms = [from_] if isinstance(from_, str) else list(from_ or ())
        out.extend(Instruction("from", value) for value in froms)
        out.extend(Instruction("adapter", value) for value in adapters)
        if template is not None:
            out.append(Instruction("template", template))
        if system is not None:
            out.append(Instruction("system", system))
        if renderer is not None:
            out.append(Instruction("renderer", renderer))
        if parser is not None:
            out.append(Instruction("parser", parser))
        for key, value in (parameters or {}).items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                out.append(Instruction("parameter", _parameter_text(item), key=key))
        out.extend(Instruction("license", value) for value in licenses)
        for message in messages:
            out.append(Instruction("message", str(message.get("content", "")), key=str(message.get("role", ""))))
        if requires is not None:
            out.append(Instruction("requires", requires))
        return cls(tuple(out))


def _parameter_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------- parsing


def parse(text: str) -> Modelfile:
    """Parse Modelfile text; raise ModelfileError naming the line of the first problem."""
    if not isinstance(text, str):
        raise ModelfileError(f"a Modelfile must be text, got {type(text).__name__}")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    lines = text.split("\n")
    instructions: list[Instruction] = []
    index = 0
    while index < len(lines):
        line_no = index + 1
        stripped = lines[index].lstrip()
        if not stripped.strip() or stripped.startswith("#"):
            index += 1
            continue
        match = _INSTRUCTION_RE.fullmatch(stripped)
        if match is None:
            word = re.split(r"[ \t]", stripped, maxsplit=1)[0]
            raise _error(line_no, f"{word!r} is not an instruction; expected one of {_expected()}")
        name = match.group(1).lower()
        rest = match.group(2)
        if name not in INSTRUCTIONS:
            raise _error(line_no, f"unknown instruction {match.group(1)!r}; expected one of {_expected()}")
        if rest is None or not rest.strip():
            raise _error(line_no, f"{name.upper()} needs a value")
        key: str | None = None
        if name == "parameter":
            pmatch = _PARAMETER_RE.fullmatch(rest.lstrip(" \t"))
            if pmatch is None:
                raise _error(line_no, "PARAMETER needs a name and a value, e.g. 'PARAMETER temperature 0.7'")
            key, rest = pmatch.group(1).lower(), pmatch.group(2)
        elif name == "message":
            mmatch = _MESSAGE_RE.fullmatch(rest.lstrip(" \t"))
            if mmatch is None:
                raise _error(line_no, "MESSAGE needs a role and a text, e.g. 'MESSAGE user Hello'")
            key, rest = mmatch.group(1).lower(), mmatch.group(2)
            if key not in MESSAGE_ROLES:
                raise _error(line_no, f"message role must be one of system, user or assistant, not {mmatch.group(1)!r}")
        read = _read_value(rest, lines, index)
        if read is None:
            raise _error(line_no, f"the quoted value of {name.upper()} is never closed")
        value, next_index = read
        _check(name, key, value, line_no)
        if name == "parameter" and key in DEPRECATED_PARAMETERS and key not in OPTION_TYPES:
            warnings.warn(
                f"Modelfile line {line_no}: parameter {key!r} is deprecated and ignored", UserWarning, stacklevel=2
            )
        else:
            instructions.append(Instruction(name, value, key=key, line=line_no))
        index = next_index
    return Modelfile(tuple(instructions))


def _expected() -> str:
    return ", ".join(name.upper() for name in INSTRUCTIONS)


def _check(name: str, key: str | None, value: str, line: int) -> None:
    if name == "parameter" and key is not None:
        if key in DEPRECATED_PARAMETERS and key not in OPTION_TYPES:
            return
        if key not in OPTION_TYPES:
            raise _error(line, f"unknown parameter {key!r}; known parameters: {', '.join(sorted(OPTION_TYPES))}")
        try:
            parse_option_value(key, value)
        except InvalidOptions as exc:
            raise _error(line, str(exc)) from None
    elif name == "requires":
        if _SEMVER_RE.fullmatch(value.strip()) is None:
            raise _error(line, f"REQUIRES needs a version such as 0.5.0, not {value!r}")
    elif name in ("from", "adapter") and not value.strip():
        raise _error(line, f"{name.upper()} needs a file path or a model name")
