"""Tools for agents: Python functions as model tools, their execution, and the tool-calling loop.

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''Current weather for a city.

        Args:
            city: The city name.
            unit: Temperature unit.
        '''

    async for event in agent_loop(engine, "qwen3", messages, [get_weather]):
        if event.kind == "content":
            print(event.content, end="")

A `Tool` carries the OpenAI/Ollama function definition (name, description,
JSON schema of the parameters) and, optionally, the Python callable that
implements it. `run_tool_call` runs one call — coroutine functions awaited,
plain functions in a worker thread — under a timeout, and always returns text:
a failure becomes an error message for the model, never an exception.

The modules: `docstrings` and `schema` describe a function, `arguments` binds a
call's JSON arguments, `definition` and `registry` hold tools, `run` runs one call,
`loop` is the agent loop over `Engine.chat`, `shell` a deny-listed shell tool.
"""

from .definition import Tool, tool
from .loop import AgentEvent, agent_loop
from .registry import ToolRegistry, normalize_tools
from .run import run_tool_call
from .shell import DEFAULT_SHELL_DENY, make_shell_tool

__all__ = [
    "DEFAULT_SHELL_DENY",
    "AgentEvent",
    "Tool",
    "ToolRegistry",
    "agent_loop",
    "make_shell_tool",
    "normalize_tools",
    "run_tool_call",
    "tool",
]
