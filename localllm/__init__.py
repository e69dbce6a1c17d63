"""localllm: Ollama's engine as a Python library.

    import localllm

    async with localllm.Engine() as engine:
        async for chunk in engine.chat("smollm2", [{"role": "user", "content": "hi"}]):
            print(chunk.message.content, end="")
"""

from .embeddings import EmbeddingsResponse, EmbedResponse
from .engine import Engine
from .errors import (
    CapabilityError,
    ContextLengthExceeded,
    ConversionError,
    DigestMismatch,
    EngineClosed,
    InsufficientMemory,
    InvalidFormat,
    InvalidModelFile,
    InvalidModelName,
    InvalidOptions,
    InvalidRequest,
    LocalLLMError,
    ModelfileError,
    ModelLoadError,
    ModelNotFound,
    PullError,
    QueueFull,
    RunnerError,
    TemplateError,
    ToolError,
)
from .options import Options
from .stream import ResponseStream
from .tools import AgentEvent, Tool, ToolRegistry, agent_loop, tool
from .types import ChatResponse, GenerateResponse, Message, ProcessModel, ToolCall, ToolCallFunction

__version__ = "0.1.0"

__all__ = [
    "AgentEvent",
    "CapabilityError",
    "ChatResponse",
    "ContextLengthExceeded",
    "ConversionError",
    "DigestMismatch",
    "EmbedResponse",
    "EmbeddingsResponse",
    "Engine",
    "EngineClosed",
    "GenerateResponse",
    "InsufficientMemory",
    "InvalidFormat",
    "InvalidModelFile",
    "InvalidModelName",
    "InvalidOptions",
    "InvalidRequest",
    "LocalLLMError",
    "Message",
    "ModelLoadError",
    "ModelNotFound",
    "ModelfileError",
    "Options",
    "ProcessModel",
    "PullError",
    "QueueFull",
    "ResponseStream",
    "RunnerError",
    "TemplateError",
    "Tool",
    "ToolCall",
    "ToolCallFunction",
    "ToolError",
    "ToolRegistry",
    "__version__",
    "agent_loop",
    "tool",
]
