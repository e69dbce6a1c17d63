"""The registry service: resolve, create, list, show, copy, delete and prune models.

It is synchronous and thread-safe (the engine calls it from worker threads);
changes to the store are serialized by one lock, `Registry.lock`.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from ..errors import (
    CapabilityError,
    InvalidModelFile,
    InvalidModelName,
    InvalidOptions,
    InvalidRequest,
    LocalLLMError,
    ModelfileError,
    ModelNotFound,
    TemplateError,
)
from ..gguf.architectures import ENCODER_ARCHITECTURES
from ..gojson import go_quote
from ..options import OPTION_TYPES, check_options
from ..types import ModelDetails, ModelTensor, ShowResponse, StoredModel, _Subscriptable
from . import modelfile as _mf
from .create import SCRATCH_PREFIX, CreateParts
from .names import ModelName
from .pairing import PairingCheck, check_projector_width, gguf_kind, model_first, projector_capabilities
from .store import (
    GGUF_MEDIA_TYPES,
    MEDIA_ADAPTER,
    MEDIA_CONFIG,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    BlobStore,
    Layer,
    Manifest,
    go_json,
)

if TYPE_CHECKING:
    from ..gguf import GGUFInfo

__all__ = [
    "Registry",
    "ResolvedModel",
    "format_parameters",
    "model_capabilities",
]

log = logging.getLogger("localllm.registry")

_FETCH_AGAIN = "Pull or create the model again."

Progress = Callable[[dict[str, Any]], None]


class Quantizer(Protocol):
    """Quantizes a GGUF file (the runner's llama.cpp does it; the registry only asks)."""

    def __call__(self, src: Path, dst: Path, *, ftype_name: str, progress: Progress) -> Path: ...


# --------------------------------------------------------------------------- data types


@attrs.frozen
class ResolvedModel(_Subscriptable):
    """Everything needed to run a model."""

    name: str
    model_path: Path
    digest: str | None = None
    params: dict[str, Any] = attrs.field(factory=dict)
    template: str | None = None
    system: str | None = None
    messages: tuple[dict[str, Any], ...] = ()
    adapters: tuple[Path, ...] = ()
    projector: Path | None = None
    license: str | None = None
    details: ModelDetails | None = None  # for a stored model
    #: The Modelfile's RENDERER and PARSER: a built-in prompt format used instead of the template (e.g. "harmony").
    renderer: str | None = None
    parser: str | None = None


# --------------------------------------------------------------------------- helpers


def _local_time(mtime: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(mtime).astimezone()


def _go_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return go_quote(value)  # as Go's %#v prints a string
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    return str(value)


def format_parameters(params: Mapping[str, Any]) -> str:
    """Parameters as ``ollama show`` prints them: the name padded to 30 columns, then the value."""
    lines: list[str] = []
    for key, value in params.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"{key:<30} {_go_value(item)}")
    return "\n".join(lines)


def model_capabilities(info: GGUFInfo, template: str | None, projector: Path | None = None) -> tuple[str, ...]:
    """What a model can do, judged from its GGUF metadata and the template it will be prompted with."""
    caps: list[str] = []
    arch = (info.architecture or "").lower()
    if info.pooling_type is not None or arch in ENCODER_ARCHITECTURES:
        return ("embedding",)
    caps.append("completion")
    text = template or ""
    if ".Tools" in text or "tools" in text or "tool_call" in text:
        caps.append("tools")
    if "<think>" in text or ".Thinking" in text or "enable_thinking" in text:
        caps.append("thinking")
    metadata = info.metadata or {}
    has_fim = "tokenizer.ggml.fim_pre_token_id" in metadata and "tokenizer.ggml.fim_suf_token_id" in metadata
    if ".Suffix" in text or has_fim:
        caps.append("insert")
    if projector is not None:
        caps.extend(projector_capabilities(projector))
    return tuple(caps)


def _projector_info(path: Path, verbose: bool) -> dict[str, Any]:
    """A projector's metadata as Ollama's show gives it: every key, its name included."""
    from ..gguf import read_info

    info = read_info(path)
    metadata = info.model_info(verbose)
    name = info.get("general.name")
    if name is not None:
        metadata["general.name"] = name
    return dict(sorted(metadata.items()))


def _typed_params(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Typed option values of a params layer; keys localllm does not know are left out."""
    known = {k: v for k, v in raw.items() if k in OPTION_TYPES}
    for key in raw.keys() - known.keys():
        log.debug("ignoring unknown parameter %r of %s", key, where)
    try:
        typed = check_options(known, source=where)
    except InvalidOptions as exc:
        raise InvalidOptions(f"{where}: {exc}") from None
    if "stop" in typed:
        typed["stop"] = list(typed["stop"])
    return typed


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or text.lower().endswith(".gguf")
        or "\\" in text
        or (len(text) > 1 and text[1] == ":")
    )


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ModelfileError(f"the Modelfile {path} is not UTF-8 text: {exc}") from None


def _expand(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _expand_from(value: str | Path, base: Path) -> Path:
    return Path(value).expanduser() if isinstance(value, os.PathLike) else _expand(value, base)


@attrs.frozen
class _Source:
    """What a FROM names: a file, or a stored model."""

    path: Path | None = None
    name: ModelName | None = None
    hf_dir: bool = False  # `path` is a Hugging Face model folder to convert


# --------------------------------------------------------------------------- the service


class Registry:
    """Models stored under `models_dir` in Ollama's layout (an Ollama ``models`` folder works as is)."""

    def __init__(self, models_dir: Path, *, quantizer: Quantizer | None = None) -> None:
        self.models_dir = Path(models_dir).expanduser()
        self._quantizer = quantizer
        self.store = BlobStore(self.models_dir)
        #: Held while the store changes (create, copy, delete, prune, the last step of a pull): the store's lock.
        self.lock = self.store.lock
        #: Capabilities of stored models by manifest digest: a digest names the model's files and template, so an
        #: entry never goes stale, and `list` reads each model's GGUF metadata once, not on every call.
        self._capabilities: dict[str, tuple[str, ...]] = {}
        #: Refuses a projector run as a model, or paired with a model of another width (once per file version).
        self._pairing = PairingCheck()

    # ---- lookup

    def find(self, model: str | ModelName) -> tuple[ModelName, Manifest]:
        """The stored spelling and manifest of `model`; ModelNotFound with advice if there is none."""
        name = ModelName.parse(model)
        stored = self.store.resolve_name(name)
        try:
            return stored, self.store.read_manifest(stored)
        except ModelNotFound:
            shown = model if isinstance(model, str) else name.display
            raise ModelNotFound(self._not_found_message(shown), model=shown) from None

    @staticmethod
    def _not_found_message(text: str) -> str:
        return f"model '{text}' not found; pull it or create it from a GGUF file or a Modelfile first"

    def resolve(self, model: str | os.PathLike[str]) -> ResolvedModel:
        """A model name (matched case-insensitively) or a path to a GGUF file -> what it takes to run it.

        A stored model wins over a file of the same name in the working folder.
        """
        if isinstance(model, os.PathLike):
            return self._resolve_path(Path(model))
        if not isinstance(model, str) or not model:
            raise InvalidModelName("a model must be named by a non-empty string or a path to a GGUF file")
        name_error: InvalidModelName | None = None
        name: ModelName | None = None
        try:
            name = ModelName.parse(model)
        except InvalidModelName as exc:
            name_error = exc
        if name is not None:
            stored = self.store.resolve_name(name)
            if self.store.has_manifest(stored):
                return self._resolve_manifest(stored, self.store.read_manifest(stored))
        path = Path(model).expanduser()
        if path.exists():
            return self._resolve_path(path)
        if name is None:
            if _looks_like_path(model):
                raise ModelNotFound(f"no such model file: {model}", model=model)
            assert name_error is not None
            raise name_error
        raise ModelNotFound(self._not_found_message(model), model=model)

    def _resolve_path(self, path: Path) -> ResolvedModel:
        from ..gguf import validate_once

        path = path.expanduser()
        if not path.exists():
            raise ModelNotFound(f"no such model file: {path}", model=str(path))
        if path.is_dir():
            raise InvalidModelFile(f"{path} is a folder; give the path of a .gguf file")
        path = path.resolve()
        validate_once(path)
        self._pairing.check(path, None, str(path))
        return ResolvedModel(name=str(path), model_path=path)

    def _read_blob(self, layer: Layer, display: str) -> bytes:
        try:
            return self.store.read_blob(layer.digest)
        except LocalLLMError as exc:  # missing, or damaged
            raise InvalidModelFile(f"model '{display}' cannot be used: {exc}. {_FETCH_AGAIN}") from None

    def _read_json_blob(self, layer: Layer, what: str, display: str) -> Any:
        try:
            return json.loads(self._read_blob(layer, display))
        except ValueError as exc:
            raise InvalidModelFile(
                f"the {what} of model '{display}' ({layer.digest}) is not valid JSON: {exc}"
            ) from None

    def _read_text_blob(self, layer: Layer, display: str) -> str:
        return self._read_blob(layer, display).decode("utf-8", "replace")

    def _stored_file(self, layer: Layer, display: str) -> Path:
        """The file of a GGUF layer of model `display`, once known intact and safe for llama.cpp to load.

        Intact: its bytes still hash to its name (a shared store can change under us). Both checks are made once
        per version of the file.
        """
        from ..gguf import validate_once

        what = GGUF_MEDIA_TYPES[layer.media_type]
        path = self.store.blob_path(layer.digest)
        if not path.is_file():
            raise InvalidModelFile(
                f"model '{display}' cannot be used: its {what} ({layer.digest}) is missing from the store."
                f" {_FETCH_AGAIN}"
            )
        if not self.store.has_blob(layer.digest):
            raise InvalidModelFile(
                f"model '{display}' cannot be used: its {what} ({layer.digest}) is damaged: its bytes no longer"
                f" match their sha256. {_FETCH_AGAIN}"
            )
        try:
            validate_once(path)
        except InvalidModelFile as exc:
            raise InvalidModelFile(
                f"model '{display}' cannot be used: its {what} is not a usable GGUF file. {exc} "
                f"Delete the model and pull or create it again."
            ) from None
        return path

    def _resolve_manifest(self, name: ModelName, manifest: Manifest) -> ResolvedModel:
        display = name.display
        model_layer = manifest.layer_of(MEDIA_MODEL)
        if model_layer is None:
            raise InvalidModelFile(f"model '{display}' has no GGUF model layer; localllm cannot run it")
        model_path = self._stored_file(model_layer, display)
        params: dict[str, Any] = {}
        template = system = None
        messages: tuple[dict[str, Any], ...] = ()
        licenses: list[str] = []
        adapters: list[Path] = []
        projector: Path | None = None
        config = self._config(manifest)
        for layer in manifest.layers:
            media = layer.media_type
            if media == MEDIA_PARAMS:
                raw = self._read_json_blob(layer, "parameters", display)
                if not isinstance(raw, dict):
                    raise InvalidModelFile(f"the parameters of model '{display}' are not a JSON object")
                params = _typed_params(raw, f"the parameters of model '{display}'")
            elif media in (MEDIA_TEMPLATE, "application/vnd.ollama.image.prompt"):
                template = self._read_text_blob(layer, display)
            elif media == MEDIA_SYSTEM:
                system = self._read_text_blob(layer, display)
            elif media == MEDIA_MESSAGES:
                raw = self._read_json_blob(layer, "messages", display)
                if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
                    raise InvalidModelFile(f"the messages of model '{display}' are not a JSON list of objects")
                messages = tuple(dict(m) for m in raw)
            elif media == MEDIA_LICENSE:
                licenses.append(self._read_text_blob(layer, display))
            elif media == MEDIA_ADAPTER:
                adapters.append(self._stored_file(layer, display))
            elif media == MEDIA_PROJECTOR:
                if projector is not None:
                    raise InvalidModelFile(
                        f"model '{display}' has two projector layers; localllm runs a model with one projector."
                        " Create the model again with a single projector (one FROM line for it)"
                    )
                projector = self._stored_file(layer, display)
        self._pairing.check(model_path, projector, display)
        return ResolvedModel(
            name=display,
            model_path=model_path,
            digest=manifest.digest,
            params=params,
            template=template,
            system=system,
            messages=messages,
            adapters=tuple(adapters),
            projector=projector,
            license="\n".join(licenses) if licenses else None,
            details=self._details(config, manifest),
            renderer=str(config.get("renderer") or "") or None,
            parser=str(config.get("parser") or "") or None,
        )

    # ---- create

    def create(
        self,
        name: str,
        *,
        from_: str | Path | None = None,
        modelfile: str | Path | None = None,
        parts: CreateParts | None = None,
        quantize: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Create (or replace) model `name` from a GGUF file, a Hugging Face model folder or an existing model.

        `modelfile` is Modelfile text or the path of one (its FROM and ADAPTER
        paths are then relative to its folder). `parts` (uploaded files, a
        template, parameters, ...) add their instructions after the
        Modelfile's; uploaded `files` replace its FROM. `from_`, when given
        and no files are, overrides the Modelfile's FROM. A FROM that names a Hugging Face model folder
        (config.json and safetensors) is converted to an F16 GGUF first.
        `quantize` ("q4_K_M", "q8_0", ...) quantizes an F32/F16/BF16 model
        with llama.cpp before it is stored. Over an existing model, a
        TEMPLATE, SYSTEM, MESSAGE or ADAPTER replaces the base model's (an
        empty TEMPLATE or SYSTEM removes it), PARAMETERs merge over the
        base's, LICENSEs add up.
        """
        emit: Progress = progress or (lambda _event: None)
        if quantize is not None:
            from ..gguf.filetypes import quantization_type

            quantize = quantization_type(quantize)
        target = ModelName.parse(name)
        parsed = _mf.Modelfile()
        base_dir = Path.cwd()
        if modelfile is not None:
            emit({"status": "parsing modelfile"})
            parsed, base_dir = self._load_modelfile(modelfile)
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) as scratch:
            if parts is not None:
                built = parts.modelfile(self.store.blob_path, Path(scratch))
                if built.froms:  # uploaded files are the model: they replace any other FROM
                    from_ = None
                    parsed = _mf.Modelfile(i for i in parsed.instructions if i.name != "from")
                # Written and read back, so the parts pass the checks a Modelfile's lines do.
                parsed = _mf.parse(_mf.Modelfile((*parsed.instructions, *built.instructions)).format())
            froms: list[str | Path] = list(parsed.froms)
            from_line = parsed.from_line
            if from_ is not None:
                froms = [from_, *froms[1:]]
                from_line = 0
            if not froms:
                raise ModelfileError(
                    "nothing to create from: name a model or a GGUF file to build on (from), upload the model's"
                    " files (files), or give a FROM line"
                )
            _check_template(parsed.template, target)
            with self.lock:
                self._create_locked(target, froms, from_line, parsed, base_dir, emit, quantize)

    def _load_modelfile(self, modelfile: str | Path) -> tuple[_mf.Modelfile, Path]:
        if isinstance(modelfile, os.PathLike):
            path = Path(modelfile).expanduser()
        elif "\n" not in modelfile and _is_file(modelfile):
            path = Path(modelfile).expanduser()
        else:
            return _mf.parse(modelfile), Path.cwd()
        try:
            text = _read_text_file(path)
        except FileNotFoundError:
            raise ModelfileError(f"no such Modelfile: {path}") from None
        return _mf.parse(text), path.resolve().parent

    def _source(self, value: str | Path, base_dir: Path, line: int) -> _Source:
        where = f"Modelfile line {line}: " if line else ""
        if isinstance(value, os.PathLike):
            path = Path(value).expanduser()
            if not path.exists():
                raise ModelNotFound(f"{where}no such model file: {path}", model=str(path))
        else:
            path = _expand(value, base_dir)
            if not path.exists():
                try:
                    name = ModelName.parse(value)
                except InvalidModelName:
                    raise ModelNotFound(f"{where}FROM {value}: no such file", model=value) from None
                stored = self.store.resolve_name(name)
                if not self.store.has_manifest(stored):
                    raise ModelNotFound(
                        f"{where}FROM {value}: no such file, and no model named '{name.display}' (pull it first)",
                        model=value,
                    )
                return _Source(name=stored)
        if path.is_dir():
            from ..gguf.convert import is_hf_model_dir

            if is_hf_model_dir(path):
                return _Source(path=path.resolve(), hf_dir=True)
            raise InvalidModelFile(
                f"{where}{path} is a folder but not a Hugging Face model (config.json and *.safetensors);"
                " FROM needs a .gguf file, a model folder or a model name"
            )
        return _Source(path=path.resolve())

    def _import_file(self, path: Path, media_type: str, emit: Progress) -> Layer:
        total = path.stat().st_size
        step = max(total // 20, 1 << 24)
        last = [0]

        def report(done: int, size: int) -> None:
            if done - last[0] >= step or done == size:
                last[0] = done
                emit({"status": "copying file", "total": size, "completed": done})

        digest = self.store.add_file(path, progress=report)
        emit({"status": f"copying file {digest}", "digest": digest, "total": total, "completed": total})
        return Layer(media_type=media_type, digest=digest, size=total)

    def _text_layer(self, data: bytes, media_type: str, emit: Progress) -> Layer:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        existed = self.store.has_blob(digest)
        self.store.add_bytes(data)
        verb = "using existing layer" if existed else "creating new layer"
        emit({"status": f"{verb} {digest}"})
        return Layer(media_type=media_type, digest=digest, size=len(data))

    def _create_locked(
        self,
        target: ModelName,
        froms: list[str | Path],
        from_line: int,
        parsed: _mf.Modelfile,
        base_dir: Path,
        emit: Progress,
        quantize: str | None = None,
    ) -> None:
        scratch: list[Path] = []
        try:
            self._create_from(target, froms, from_line, parsed, base_dir, emit, quantize, scratch)
        finally:
            for path in scratch:
                path.unlink(missing_ok=True)

    def _scratch_path(self) -> Path:
        """A temporary file in the blob store (a crash's leftovers are pruned; `add_file` renames, not copies, it)."""
        return self.store.temp_path()

    def _convert(self, folder: Path, emit: Progress, scratch: list[Path]) -> Path:
        from ..gguf.convert import convert_hf_to_gguf

        emit({"status": "converting model"})
        out = self._scratch_path()
        scratch.append(out)
        return convert_hf_to_gguf(folder, out, out_type="f16", progress=emit)

    def _quantize(self, path: Path, info: GGUFInfo, quantize: str, emit: Progress, scratch: list[Path]) -> Path:
        from ..gguf.filetypes import UNQUANTIZED_TYPES

        if info.file_type == quantize:
            return path
        if info.file_type not in UNQUANTIZED_TYPES:
            raise InvalidRequest(
                f"quantization is only supported for F32, F16 and BF16 models; this model is {info.file_type}"
            )
        if self._quantizer is None:
            raise CapabilityError(
                "this registry was opened without a quantizer; create quantized models through an Engine"
            )
        out = self._scratch_path()
        scratch.append(out)
        return self._quantizer(path, out, ftype_name=quantize, progress=emit)

    def _create_from(
        self,
        target: ModelName,
        froms: list[str | Path],
        from_line: int,
        parsed: _mf.Modelfile,
        base_dir: Path,
        emit: Progress,
        quantize: str | None,
        scratch: list[Path],
    ) -> None:
        from ..gguf import read_info, validate_once

        target = self.store.resolve_name(target)
        froms = model_first([_expand_from(value, base_dir) for value in froms], froms)
        source = self._source(froms[0], base_dir, from_line)
        layers: list[Layer] = []
        base_config: dict[str, Any] = {}
        base_params: dict[str, Any] = {}
        if source.path is not None:
            model_path = self._convert(source.path, emit, scratch) if source.hf_dir else source.path
            emit({"status": "parsing GGUF"})
            validate_once(model_path)
            info = read_info(model_path)
            kind = gguf_kind(info)
            if kind != "model":
                raise InvalidModelFile(f"{source.path} is a {kind} GGUF, not a model; FROM needs a model file")
            if quantize is not None:
                quantized = self._quantize(model_path, info, quantize, emit, scratch)
                if quantized != model_path:
                    model_path = quantized
                    info = read_info(model_path)
            layers.append(self._import_file(model_path, MEDIA_MODEL, emit))
        else:
            assert source.name is not None
            base = self.store.read_manifest(source.name)
            parent = source.name.display
            model_layer = base.layer_of(MEDIA_MODEL)
            if model_layer is None:
                raise InvalidModelFile(f"model '{parent}' has no GGUF model layer to build on")
            for layer in base.layers:
                if layer.media_type in GGUF_MEDIA_TYPES:
                    self._stored_file(layer, parent)
                elif not self.store.has_blob(layer.digest):
                    raise InvalidModelFile(
                        f"model '{parent}' cannot be used: its blob {layer.digest} is missing or damaged."
                        f" {_FETCH_AGAIN}"
                    )
                layers.append(attrs.evolve(layer, from_=parent))
                emit({"status": f"using existing layer {layer.digest}"})
            try:
                loaded = json.loads(self.store.read_blob(base.config.digest))
                base_config = loaded if isinstance(loaded, dict) else {}
            except (LocalLLMError, ValueError):
                base_config = {}
            params_layer = base.layer_of(MEDIA_PARAMS)
            if params_layer is not None:
                raw = self._read_json_blob(params_layer, "parameters", parent)
                base_params = raw if isinstance(raw, dict) else {}
            info = read_info(self.store.blob_path(model_layer.digest))
            if quantize is not None:
                blob = self.store.blob_path(model_layer.digest)
                quantized = self._quantize(blob, info, quantize, emit, scratch)
                if quantized != blob:
                    info = read_info(quantized)
                    new_layer = self._import_file(quantized, MEDIA_MODEL, emit)
                    layers = [new_layer if layer.media_type == MEDIA_MODEL else layer for layer in layers]

        # further FROM lines: a vision projector (or an adapter) next to the model; they replace a base model's
        added_projector = False
        for extra in froms[1:]:
            extra_source = self._source(extra, base_dir, 0)
            if extra_source.path is None:
                raise ModelfileError(f"FROM {extra}: only the first FROM may name a model; later ones must be files")
            validate_once(extra_source.path)
            kind = gguf_kind(read_info(extra_source.path))
            if kind == "model":
                raise ModelfileError(f"FROM {extra}: a Modelfile can hold one model; this file is a second model")
            media = MEDIA_PROJECTOR if kind == "projector" else MEDIA_ADAPTER
            if media == MEDIA_PROJECTOR:
                if added_projector:
                    raise InvalidModelFile(
                        f"FROM {extra}: a second projector; a model has one projector, give only the one made for it"
                    )
                added_projector = True
            layers = [layer for layer in layers if layer.media_type != media]
            layers.append(self._import_file(extra_source.path, media, emit))

        if parsed.adapters:
            new_adapters = []
            for value in parsed.adapters:
                path = _expand(value, base_dir)
                if not path.is_file():
                    raise ModelNotFound(f"ADAPTER {value}: no such file")
                try:
                    validate_once(path)
                except InvalidModelFile as exc:
                    raise InvalidModelFile(f"ADAPTER {value}: {exc}") from None
                kind = gguf_kind(read_info(path))
                if kind != "adapter":
                    raise InvalidModelFile(f"ADAPTER {value}: {path} is a {kind} GGUF, not a LoRA adapter")
                new_adapters.append(self._import_file(path, MEDIA_ADAPTER, emit))
            layers = [layer for layer in layers if layer.media_type != MEDIA_ADAPTER] + new_adapters

        def replace(media_type: str, text: str | None) -> None:
            nonlocal layers
            if text is None:
                return
            layers = [layer for layer in layers if layer.media_type != media_type]
            if text:
                layers.append(self._text_layer(text.encode("utf-8"), media_type, emit))

        replace(MEDIA_TEMPLATE, parsed.template)
        replace(MEDIA_SYSTEM, parsed.system)
        for text in parsed.licenses:
            layer = self._text_layer(text.encode("utf-8"), MEDIA_LICENSE, emit)
            if all(existing.digest != layer.digest for existing in layers if existing.media_type == MEDIA_LICENSE):
                layers.append(layer)
        new_params = parsed.parameters
        if new_params:
            merged = {**base_params, **new_params}
            layers = [layer for layer in layers if layer.media_type != MEDIA_PARAMS]
            layers.append(self._text_layer(go_json(merged), MEDIA_PARAMS, emit))
        if parsed.messages:
            layers = [layer for layer in layers if layer.media_type != MEDIA_MESSAGES]
            layers.append(self._text_layer(go_json(list(parsed.messages)), MEDIA_MESSAGES, emit))

        projector_layer = next((layer for layer in layers if layer.media_type == MEDIA_PROJECTOR), None)
        if projector_layer is not None:
            check_projector_width(info, read_info(self.store.blob_path(projector_layer.digest)), target.display)
        config = _config_for(info, layers, parsed, base_config)
        config_layer = self._text_layer(go_json(config), MEDIA_CONFIG, _quiet)
        manifest = Manifest(config=config_layer, layers=tuple(layers))

        emit({"status": "writing manifest"})
        self.store.commit_manifest(target, manifest)
        emit({"status": "success"})

    # ---- list / show

    def _config(self, manifest: Manifest) -> dict[str, Any]:
        try:
            data = json.loads(self.store.read_blob(manifest.config.digest))
        except (LocalLLMError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _details(config: Mapping[str, Any], manifest: Manifest | None) -> ModelDetails:
        model_layer = manifest.layer_of(MEDIA_MODEL) if manifest is not None else None
        families = config.get("model_families")
        return ModelDetails(
            parent_model=(model_layer.from_ or "") if model_layer is not None else "",
            format=str(config.get("model_format") or ""),
            family=str(config.get("model_family") or ""),
            families=tuple(str(f) for f in families) if isinstance(families, list) and families else None,
            parameter_size=str(config.get("model_type") or ""),
            quantization_level=str(config.get("file_type") or ""),
        )

    def list(self) -> builtins.list[StoredModel]:
        """Every stored model, most recently modified first."""
        entries: builtins.list[tuple[float, StoredModel]] = []
        for name, manifest, mtime in self.store.list_manifests():
            display = name.display
            entries.append(
                (
                    mtime,
                    StoredModel(
                        name=display,
                        model=display,
                        size=manifest.size,
                        digest=manifest.digest,
                        modified_at=_local_time(mtime),
                        details=self._details(self._config(manifest), manifest),
                        capabilities=builtins.list(self._stored_capabilities(manifest)),
                    ),
                )
            )
        entries.sort(key=lambda pair: pair[0], reverse=True)
        return [entry for _, entry in entries]

    def _stored_capabilities(self, manifest: Manifest) -> tuple[str, ...]:
        """What a stored model can do, as `show` says; empty for a model whose files cannot be read (show says why)."""
        known = self._capabilities.get(manifest.digest)
        if known is not None:
            return known
        from ..gguf import read_info

        model_layer = manifest.layer_of(MEDIA_MODEL)
        if model_layer is None:
            return ()
        template: str | None = None
        projector: Path | None = None
        try:
            info = read_info(self.store.blob_path(model_layer.digest))
            for layer in manifest.layers:
                if layer.media_type in (MEDIA_TEMPLATE, "application/vnd.ollama.image.prompt"):
                    template = self.store.read_blob(layer.digest).decode("utf-8", "replace")
                elif layer.media_type == MEDIA_PROJECTOR and projector is None:
                    projector = self.store.blob_path(layer.digest)
        except (LocalLLMError, OSError):
            return ()
        capabilities = model_capabilities(info, template if template is not None else info.chat_template, projector)
        self._capabilities[manifest.digest] = capabilities
        return capabilities

    def show(self, name: str, *, verbose: bool = False) -> ShowResponse:
        """Details of a model (a name, or a path to a GGUF file), like ``ollama show``."""
        from ..gguf import read_info

        resolved = self.resolve(name)
        manifest: Manifest | None = None
        config: dict[str, Any] = {}
        short = resolved.name
        if resolved.digest is not None:
            stored, manifest = self.find(resolved.name)
            config = self._config(manifest)
            mtime = self.store.manifest_mtime(stored)
            short = stored.display
        else:
            mtime = resolved.model_path.stat().st_mtime
        info = read_info(resolved.model_path)
        details = self._details(config, manifest)
        details = attrs.evolve(
            details,
            format=details.format or "gguf",
            family=details.family or (info.architecture or ""),
            families=details.families or ((info.architecture,) if info.architecture else None),
            parameter_size=details.parameter_size or (info.parameter_size or ""),
            quantization_level=details.quantization_level or (info.file_type or ""),
            context_length=info.context_length,
            embedding_length=info.embedding_length,
        )
        model_info = dict(info.model_info(verbose))
        model_info.pop("general.name", None)
        model_info.pop("tokenizer.chat_template", None)
        template = resolved.template if resolved.template is not None else (info.chat_template or "")
        capabilities = model_capabilities(info, template, resolved.projector)
        if manifest is not None:
            self._capabilities[manifest.digest] = capabilities
        return ShowResponse(
            modelfile=self._show_modelfile(resolved, short),
            parameters=format_parameters(resolved.params),
            template=template,
            details=details,
            modelinfo=model_info,
            capabilities=builtins.list(capabilities),
            modified_at=_local_time(mtime),
            system=resolved.system or "",
            license=resolved.license or "",
            messages=[{"role": m.get("role", ""), "content": m.get("content", "")} for m in resolved.messages],
            tensors=[ModelTensor(t.name, t.type_name, builtins.list(t.shape)) for t in info.tensors],
            projector_info=_projector_info(resolved.projector, verbose) if resolved.projector is not None else None,
        )

    @staticmethod
    def _show_modelfile(resolved: ResolvedModel, short: str) -> str:
        froms = [str(resolved.model_path)]
        if resolved.projector is not None:
            froms.append(str(resolved.projector))
        built = _mf.Modelfile.build(
            from_=froms,
            adapters=[str(p) for p in resolved.adapters],
            template=resolved.template,
            system=resolved.system,
            parameters=resolved.params,
            licenses=[resolved.license] if resolved.license else [],
            messages=resolved.messages,
        )
        try:
            body = built.format()
        except ModelfileError:
            body = "\n".join(line for line in _format_lenient(built)) + "\n"
        header = (
            '# Modelfile generated by "localllm show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {short}\n\n"
        )
        return header + body

    # ---- pull

    def pull(
        self,
        name: str,
        *,
        progress: Progress | None = None,
        insecure: bool = False,
        cancel: threading.Event | None = None,
    ) -> None:
        """Download `name` from Hugging Face (`hf.co/owner/repo:quant`) or an OCI registry into the store."""
        from .pull import pull as _pull

        _pull(self.store, name, progress=progress or _quiet, insecure=insecure, cancel=cancel)

    # ---- copy / delete / prune

    def copy(self, source: str, destination: str) -> None:
        """Make `destination` another name for the model `source` (a replaced destination's blobs are freed)."""
        with self.lock:
            src, manifest = self.find(source)
            dst = self.store.resolve_name(ModelName.parse(destination))
            if dst == src:
                return
            self.store.commit_manifest(dst, manifest)

    def delete(self, name: str) -> None:
        """Remove model `name` and every blob no other model uses (a damaged manifest too, and what it names)."""
        with self.lock:
            stored = self.store.resolve_name(ModelName.parse(name))
            digests = self.store.manifest_digests(stored)
            try:
                self.store.delete_manifest(stored)
            except ModelNotFound:
                raise ModelNotFound(self._not_found_message(name), model=name) from None
            self.store.remove_blobs(digests)

    def prune(self, *, grace: float = 0.0) -> builtins.list[str]:
        """Remove blobs no model uses and leftover partial or temporary files; return their file names.

        Files younger than `grace` seconds are kept (use it while downloads may be running).
        """
        with self.lock:
            return self.store.prune(grace=grace)


# --------------------------------------------------------------------------- module helpers


def _quiet(_event: dict[str, Any]) -> None:
    return None


def _is_file(text: str) -> bool:
    try:
        return bool(text.strip()) and Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _check_template(template: str | None, target: ModelName) -> None:
    """Refuse a TEMPLATE that does not parse now, rather than at the model's first use."""
    from ..chat.template import load_template

    try:
        load_template(template)
    except TemplateError as exc:
        raise TemplateError(f"cannot create '{target.display}': its TEMPLATE does not parse: {exc}") from None


def _config_for(
    info: GGUFInfo, layers: list[Layer], parsed: _mf.Modelfile, base_config: Mapping[str, Any]
) -> dict[str, Any]:
    arch = info.architecture or ""
    config: dict[str, Any] = {
        "model_format": "gguf",
        "model_family": arch,
        "model_families": [arch] if arch else [],
        "model_type": info.parameter_size or "",
        "file_type": info.file_type or "",
    }
    for key, value in (("renderer", parsed.renderer), ("parser", parsed.parser), ("requires", parsed.requires)):
        if key == "requires" and value:
            value = value.strip().removeprefix("v")
        chosen = value or base_config.get(key)
        if chosen:
            config[key] = chosen
    config["architecture"] = "amd64"
    config["os"] = "linux"
    config["rootfs"] = {"type": "layers", "diff_ids": [layer.digest for layer in layers]}
    return config


def _format_lenient(modelfile: _mf.Modelfile) -> list[str]:
    """Format what can be written; a value that cannot be quoted is written in triple quotes anyway."""
    lines = []
    for instruction in modelfile.instructions:
        try:
            lines.append(instruction.format())
        except ModelfileError:
            prefix = instruction.name.upper() + (f" {instruction.key}" if instruction.key else "")
            lines.append(f'{prefix} """{instruction.value}"""')
    return lines
