"""Ollama's Go text/template chat templates, parsed and rendered in Python.

A model created by Ollama (or from a Modelfile with a TEMPLATE) carries a Go `text/template`. This
package implements the part of that language the templates use — text and actions, `{{- -}}`
trimming, comments, pipelines, variables (`$`, `$x :=`, `$x =`, `range $i, $m :=`),
`if`/`else if`/`else`, `range` (with `break`/`continue`), `with`/`else with`,
`define`/`template`/`block`, field access, and the builtin functions plus Ollama's own (`json`,
`currentDate`, `yesterdayDate`, `toTypeScriptType`) — and renders it the way Ollama's
`template.Execute` does.

As in Go, the language is in layers: `lexer` and `parse` build the tree, `exec` runs it with the
functions of `funcs` over the values of `values`; `tree` holds Ollama's readings of a tree and
`ollama` Ollama's data model and `GoTemplate`.

Templates are untrusted input: every failure is a `TemplateError` naming the line and column,
execution runs under `TemplateLimits` (time, steps, output) and a depth limit, and nothing reaches
the host beyond the values passed in.
"""

from ...gojson import go_format_float, go_json
from .lexer import GoTemplateError
from .ollama import GoTemplate

__all__ = ["GoTemplate", "GoTemplateError", "go_format_float", "go_json"]
