"""Reading a function's docstring: its summary and the description of each parameter."""

from __future__ import annotations

import inspect
import re

import attrs

__all__ = ["Docstring", "parse_docstring"]


@attrs.frozen
class Docstring:
    description: str
    params: dict[str, str]


_SECTION = re.compile(
    r"^(args|arguments|parameters|params|keyword args|keyword arguments|other parameters|returns?|yields?|raises?|"
    r"examples?|notes?|see also|warnings?|attributes|references|todo)\s*:?\s*$",
    re.I,
)
_PARAM_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments", "other parameters"}


def parse_docstring(doc: str | None) -> Docstring:
    """Summary and parameter descriptions from a Google, Sphinx or NumPy style docstring."""
    if not doc:
        return Docstring("", {})
    lines = inspect.cleandoc(doc).splitlines()
    params: dict[str, str] = {}
    desc_lines: list[str] = []
    section: str | None = None
    numpy_style = False
    current: str | None = None
    base_indent = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        sphinx = re.match(r"^:(?:param|parameter|arg|argument|key|keyword)\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$", stripped)
        if sphinx:
            section, current = "sphinx", sphinx.group(1)
            params[current] = sphinx.group(2).strip()
            i += 1
            continue
        if re.match(r"^:(type|rtype|returns?|raises?)\b", stripped):
            section, current = "sphinx-other", None
            i += 1
            continue
        underline = i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip() or "x")
        header = _SECTION.match(stripped)
        if header and (stripped.endswith(":") or underline):
            section = header.group(1).lower()
            numpy_style = bool(underline)
            current = None
            base_indent = -1
            i += 2 if underline else 1
            continue
        if section is None:
            desc_lines.append(line)
        elif section in _PARAM_SECTIONS:
            if stripped:
                indent = len(line) - len(line.lstrip())
                if base_indent < 0:
                    base_indent = indent
                google = re.match(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", stripped)
                numpy = re.match(r"^\*{0,2}(\w+)\s*(?::.*)?$", stripped)
                if indent <= base_indent and numpy_style and numpy:
                    current = numpy.group(1)  # "name : type"; the description follows, indented
                    params[current] = ""
                elif indent <= base_indent and google:
                    current = google.group(1)
                    params[current] = google.group(2).strip()
                elif indent <= base_indent and re.match(r"^\w+$", stripped):
                    current = stripped
                    params[current] = ""
                elif current is not None:
                    params[current] = (params[current] + " " + stripped).strip()
        elif section == "sphinx" and current is not None and stripped:
            params[current] = (params[current] + " " + stripped).strip()
        i += 1
    paragraphs = re.split(r"\n\s*\n", "\n".join(desc_lines).strip())
    description = "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
    return Docstring(description, params)
