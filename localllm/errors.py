"""The exception hierarchy: every failure localllm reports is a LocalLLMError."""

from __future__ import annotations


class LocalLLMError(Exception):
    """Base class of every error localllm raises."""


class ModelNotFound(LocalLLMError):
    """No model by that name or path exists."""


class InvalidModelName(LocalLLMError, ValueError):
    """A model name breaks the naming rules."""


class InvalidModelFile(LocalLLMError):
    """A model file is not a valid GGUF file (or not one llama.cpp can load)."""


class InvalidOptions(LocalLLMError, ValueError):
    """An option has the wrong type or an impossible value."""


class InvalidFormat(LocalLLMError, ValueError):
    """A structured-output format or JSON schema cannot be used."""


class InvalidRequest(LocalLLMError, ValueError):
    """A request is malformed (bad messages, prompt, or arguments)."""


class TemplateError(LocalLLMError):
    """A chat or prompt template failed to parse or render."""


class ModelfileError(LocalLLMError, ValueError):
    """A Modelfile could not be parsed."""


class CapabilityError(LocalLLMError):
    """The model cannot do what was asked (embed, think, tools, ...)."""


class ContextLengthExceeded(LocalLLMError):
    """A prompt does not fit in the model's context window."""


class QueueFull(LocalLLMError):
    """Too many requests are waiting; try again later."""


class InsufficientMemory(LocalLLMError):
    """A model can never fit in the memory available."""


class ModelLoadError(LocalLLMError):
    """llama.cpp failed to load a model or create its context."""


class RunnerError(LocalLLMError):
    """A runner failed while processing a request."""


class EngineClosed(LocalLLMError):
    """The engine was used outside its `async with` block or after closing."""


class PullError(LocalLLMError):
    """Downloading a model failed."""


class DigestMismatch(PullError):
    """Downloaded bytes do not match their sha256 digest."""


class ConversionError(LocalLLMError):
    """Converting a model to GGUF failed."""


class ToolError(LocalLLMError):
    """A tool definition is invalid or a tool failed."""
