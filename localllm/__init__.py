"""localllm: Ollama's engine as a Python library.

import localllm

async with localllm.Engine() as engine:
    async for chunk in engine.chat("smollm2", [{"role": "user", "content": "hi"}]):
        print(chunk.message.content, end="")
"""

from .embeddings import EmbeddingsResponse, EmbedResponse
from .engine import Engine
from .errors import (
    BlobTooLarge,
    CapabilityError,
    ContextLengthExceeded,
    ConversionError,
    DigestMismatch,
    EngineClosed,
    InputError,
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
    NotFoundError,
    PullError,
    QueueFull,
    ResourceError,
    RunnerError,
    TemplateError,
    ToolError,
    UnavailableError,
)
from .options import Options
from .stream import ResponseStream
from .tools import AgentEvent, Tool, ToolRegistry, agent_loop, tool
from .types import ChatResponse, GenerateResponse, Message, ProcessModel, ToolCall, ToolCallFunction

__version__ = "0.1.0"

__all__ = [
    "AgentEvent",
    "BlobTooLarge",
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
    "InputError",
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
    "NotFoundError",
    "Options",
    "ProcessModel",
    "PullError",
    "QueueFull",
    "ResourceError",
    "ResponseStream",
    "RunnerError",
    "TemplateError",
    "Tool",
    "ToolCall",
    "ToolCallFunction",
    "ToolError",
    "ToolRegistry",
    "UnavailableError",
    "__version__",
    "agent_loop",
    "tool",
]
