"""Chat templates, tool-call and thinking parsers, structured-output grammars."""

from .template import TemplateLimits

__all__ = ["TemplateLimits"]
