"""Chat templates, tool-call and thinking parsers, structured-output grammars."""

from .limits import TemplateLimits

__all__ = ["TemplateLimits"]
