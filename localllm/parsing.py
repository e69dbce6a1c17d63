"""What users type, read as Ollama reads it: model names, keep_alive durations and Modelfiles.

The public door to rules kept in the rooms that own them (`registry.names`,
`scheduler.keepalive`, `registry.modelfile`), for the front doors (the HTTP
shim, the command line) and applications, which use only the public surface.
"""

from __future__ import annotations

from .registry.modelfile import Instruction, Modelfile
from .registry.modelfile import parse as parse_modelfile
from .registry.names import ModelName, is_valid_name
from .scheduler.keepalive import parse_keep_alive

__all__ = ["Instruction", "ModelName", "Modelfile", "is_valid_name", "parse_keep_alive", "parse_modelfile"]
