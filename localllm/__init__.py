"""localllm: Ollama's engine as a Python library.

import localllm

async with localllm.Engine() as engine:
    async for chunk in engine.chat("smollm2", [{"role": "user", "content": "hi"}]):
        print(chunk.message.content, end="")

reply = localllm.chat("smollm2", [{"role": "user", "content": "hi"}])   # synchronous: localllm.Client
"""

# The module-level calls, as in the ollama client; left out of __all__ (a star import would shadow list and copy).
from .api import EngineAPI
from .client import Client
from .client import chat as chat
from .client import copy as copy
from .client import create as create
from .client import create_blob as create_blob
from .client import delete as delete
from .client import embed as embed
from .client import embeddings as embeddings
from .client import generate as generate
from .client import list as list
from .client import ps as ps
from .client import pull as pull
from .client import push as push
from .client import send as send
from .client import show as show
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
    RegistryUnreachable,
    ResourceError,
    RunnerError,
    TemplateError,
    ToolError,
    UnavailableError,
)
from .media import DecodedAudio, DecodedImage, MediaLimits
from .options import Options
from .parsing import Modelfile, ModelName, parse_keep_alive, parse_modelfile
from .request import ChatRequest, EmbedRequest, GenerateRequest, Request
from .stream import ResponseStream
from .tools import AgentEvent, Tool, ToolRegistry, agent_loop, tool
from .types import (
    ChatResponse,
    GenerateResponse,
    ListResponse,
    Logprob,
    Message,
    ModelDetails,
    ProcessModel,
    ProcessResponse,
    ProgressResponse,
    ShowResponse,
    StatusResponse,
    StoredModel,
    TokenLogprob,
    ToolCall,
    ToolCallFunction,
)

__version__ = "0.1.0"

__all__ = [
    "AgentEvent",
    "BlobTooLarge",
    "CapabilityError",
    "ChatRequest",
    "ChatResponse",
    "Client",
    "ContextLengthExceeded",
    "ConversionError",
    "DecodedAudio",
    "DecodedImage",
    "DigestMismatch",
    "EmbedRequest",
    "EmbedResponse",
    "EmbeddingsResponse",
    "Engine",
    "EngineAPI",
    "EngineClosed",
    "GenerateRequest",
    "GenerateResponse",
    "InputError",
    "InsufficientMemory",
    "InvalidFormat",
    "InvalidModelFile",
    "InvalidModelName",
    "InvalidOptions",
    "InvalidRequest",
    "ListResponse",
    "LocalLLMError",
    "Logprob",
    "MediaLimits",
    "Message",
    "ModelDetails",
    "ModelLoadError",
    "ModelName",
    "ModelNotFound",
    "Modelfile",
    "ModelfileError",
    "NotFoundError",
    "Options",
    "ProcessModel",
    "ProcessResponse",
    "ProgressResponse",
    "PullError",
    "QueueFull",
    "RegistryUnreachable",
    "Request",
    "ResourceError",
    "ResponseStream",
    "RunnerError",
    "ShowResponse",
    "StatusResponse",
    "StoredModel",
    "TemplateError",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallFunction",
    "ToolError",
    "ToolRegistry",
    "UnavailableError",
    "__version__",
    "agent_loop",
    "parse_keep_alive",
    "parse_modelfile",
    "tool",
]
