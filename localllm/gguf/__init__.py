"""Reading and validating GGUF files before llama.cpp ever sees them."""

from localllm.gguf.filetypes import file_type_name
from localllm.gguf.inspect import GGUFInfo, TensorInfo, human_number, read_info
from localllm.gguf.validate import is_gguf, validate_bytes, validate_file, validate_once

__all__ = [
    "GGUFInfo",
    "TensorInfo",
    "file_type_name",
    "human_number",
    "is_gguf",
    "read_info",
    "validate_bytes",
    "validate_file",
    "validate_once",
]
