"""A shell-command tool that refuses commands matching a deny-list."""

from __future__ import annotations

import re
from collections.abc import Iterable

import anyio

from .definition import Tool

__all__ = ["DEFAULT_SHELL_DENY", "make_shell_tool"]

DEFAULT_SHELL_DENY: tuple[str, ...] = (
    r"\brm\s+(-[a-zA-Z]*[rf][a-zA-Z]*\s+)+(/|~|\*|\$HOME)(\s|$)",
    r"\bmkfs(\.\w+)?\b",
    r"\bdd\s+.*\bof=/dev/",
    r">\s*/dev/(sd|nvme|hd|vd)",
    r"\b(shutdown|reboot|halt|poweroff)\b",
    r":\(\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:",
    r"\bchmod\s+(-R\s+)?[0-7]*777\s+/(\s|$)",
    r"\b(curl|wget)\b[^|]*\|\s*(sudo\s+)?(ba|z|da)?sh\b",
    r"\bsudo\b",
)


def make_shell_tool(
    *,
    deny: Iterable[str] = DEFAULT_SHELL_DENY,
    cwd: str | None = None,
    timeout: float | None = 30,
    needs_approval: bool = True,
    max_output: int = 20_000,
    name: str = "run_shell",
) -> Tool:
    """A tool that runs a shell command, refusing any command that matches a deny pattern (regular expressions).

    It asks for approval by default; the deny-list applies even to approved calls.
    """
    patterns = [re.compile(p) for p in deny]

    async def run_shell(command: str) -> str:
        """Run a shell command and return its exit status and output.

        Args:
            command: The command line to run with /bin/sh.
        """
        if not isinstance(command, str) or not command.strip():
            return "error: empty command"
        for pattern in patterns:
            if pattern.search(command):
                return f"error: command refused by policy (matches {pattern.pattern!r})"
        result = await anyio.run_process(["/bin/sh", "-c", command], cwd=cwd, check=False)
        output = (result.stdout or b"").decode("utf-8", errors="replace")
        errors = (result.stderr or b"").decode("utf-8", errors="replace")
        text = output + (("\n" if output and not output.endswith("\n") else "") + errors if errors else "")
        if len(text) > max_output:
            text = text[:max_output] + f"\n... ({len(text) - max_output} more characters)"
        return f"exit status {result.returncode}\n{text}"

    return Tool.from_function(run_shell, name=name, needs_approval=needs_approval, timeout=timeout)
