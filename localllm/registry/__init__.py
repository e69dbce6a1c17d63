"""Model names, the blob store and manifests, Modelfiles, create and pull."""

from .modelfile import Instruction, Modelfile
from .modelfile import parse as parse_modelfile
from .names import DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG, ModelName, is_valid_name
from .registry import Registry, ResolvedModel, format_parameters, model_capabilities
from .store import BlobStore, Layer, Manifest

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TAG",
    "BlobStore",
    "Instruction",
    "Layer",
    "Manifest",
    "ModelName",
    "Modelfile",
    "Registry",
    "ResolvedModel",
    "format_parameters",
    "is_valid_name",
    "model_capabilities",
    "parse_modelfile",
]
