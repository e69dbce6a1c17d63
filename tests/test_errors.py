"""The error tree: categories a caller can catch, data on the errors, and the HTTP statuses they map to."""

from __future__ import annotations

import inspect
import pickle

import pytest

import localllm
from localllm import errors
from localllm.http.common import APIError, status_for

pytestmark = pytest.mark.fast

ERROR_CLASSES = [
    cls
    for _name, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.LocalLLMError) and cls.__module__ == errors.__name__
]

CATEGORIES = {
    errors.InputError: [
        errors.InvalidModelName,
        errors.InvalidOptions,
        errors.InvalidFormat,
        errors.InvalidRequest,
        errors.InvalidModelFile,
        errors.ModelfileError,
        errors.TemplateError,
        errors.ToolError,
        errors.CapabilityError,
        errors.ContextLengthExceeded,
        errors.BlobTooLarge,
    ],
    errors.NotFoundError: [errors.ModelNotFound],
    errors.UnavailableError: [errors.QueueFull, errors.EngineClosed],
    errors.ResourceError: [errors.InsufficientMemory],
    errors.RunnerError: [errors.ModelLoadError],
    errors.PullError: [errors.DigestMismatch, errors.RegistryUnreachable],
    errors.ConversionError: [],
}


def test_every_error_is_in_one_category() -> None:
    listed = {category for category in CATEGORIES} | {cls for members in CATEGORIES.values() for cls in members}
    assert set(ERROR_CLASSES) == listed | {errors.LocalLLMError}
    for category, members in CATEGORIES.items():
        assert category.__bases__[0] is errors.LocalLLMError
        for cls in members:
            others = [other for other in CATEGORIES if other is not category]
            assert issubclass(cls, category) and not any(issubclass(cls, other) for other in others), cls


def test_categories_are_also_the_builtin_a_caller_expects() -> None:
    assert issubclass(errors.InputError, ValueError)
    assert issubclass(errors.NotFoundError, LookupError)
    with pytest.raises(ValueError):
        raise errors.TemplateError("bad template")
    with pytest.raises(LookupError):
        raise errors.ModelNotFound("no such model")
    for category in (errors.UnavailableError, errors.ResourceError, errors.RunnerError, errors.PullError):
        assert not issubclass(category, (ValueError, LookupError))


def test_every_class_is_exported() -> None:
    for cls in ERROR_CLASSES:
        assert getattr(localllm, cls.__name__) is cls
        assert cls.__name__ in localllm.__all__


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_a_message_alone_still_works(cls: type[errors.LocalLLMError]) -> None:
    error = cls("what went wrong")
    assert str(error) == "what went wrong"
    assert error.args == ("what went wrong",)


def test_data_builds_the_message() -> None:
    memory = errors.InsufficientMemory(needed=3 << 30, available=1 << 30)
    assert (memory.needed, memory.available) == (3 << 30, 1 << 30)
    assert str(memory) == (
        f"the model needs 3.00 GiB ({3 << 30} bytes) but only 1.00 GiB ({1 << 30} bytes) of memory is available "
        "even with every other model unloaded; use a smaller model, num_ctx or num_parallel"
    )
    missing = errors.ModelNotFound(model="smollm2")
    assert missing.model == "smollm2" and str(missing) == "model 'smollm2' not found"
    mismatch = errors.DigestMismatch(expected="sha256:" + "a" * 64, actual="sha256:" + "b" * 64)
    assert str(mismatch) == f"blob has digest sha256:{'b' * 64}, expected sha256:{'a' * 64}"
    too_long = errors.ContextLengthExceeded(tokens=5000, limit=4096)
    assert (too_long.tokens, too_long.limit) == (5000, 4096)
    assert str(too_long) == "the prompt has 5000 tokens but the context holds 4096"
    too_large = errors.BlobTooLarge(limit=10)
    assert too_large.limit == 10 and str(too_large) == "blob is larger than the limit of 10 bytes"


def test_a_message_wins_over_data_and_data_defaults_to_none() -> None:
    error = errors.ModelNotFound("no such model file: x.gguf", model="x.gguf")
    assert str(error) == "no such model file: x.gguf" and error.model == "x.gguf"
    assert errors.ModelNotFound("gone").model is None
    assert errors.InsufficientMemory("too big").needed is None


def test_errors_survive_pickling_with_their_data() -> None:
    error = errors.InsufficientMemory(needed=2, available=1)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is errors.InsufficientMemory
    assert (str(copy), copy.needed, copy.available) == (str(error), 2, 1)
    copy = pickle.loads(pickle.dumps(errors.DigestMismatch("pulling 'x': bad", expected="e", actual="a")))
    assert (str(copy), copy.expected, copy.actual) == ("pulling 'x': bad", "e", "a")


# --------------------------------------------------------------------------- HTTP


@pytest.mark.parametrize(
    ("category", "status"),
    [
        (errors.InputError, 400),
        (errors.NotFoundError, 404),
        (errors.UnavailableError, 503),
        (errors.ResourceError, 500),
        (errors.RunnerError, 500),
        (errors.PullError, 500),
        (errors.ConversionError, 500),
    ],
)
def test_http_status_follows_the_category(category: type[errors.LocalLLMError], status: int) -> None:
    assert status_for(category("x")) == status
    for cls in CATEGORIES[category]:
        if cls not in (errors.BlobTooLarge, errors.RegistryUnreachable):
            assert status_for(cls("x")) == status, cls


def test_http_statuses_of_the_rest() -> None:
    assert status_for(errors.BlobTooLarge(limit=1)) == 413
    assert status_for(errors.RegistryUnreachable(host="registry.example")) == 502  # not 404: pulling again won't help
    assert status_for(errors.LocalLLMError("x")) == 500
    assert status_for(RuntimeError("x")) == 500
    assert status_for(APIError(418, "x")) == 418


def test_openai_error_bodies_follow_the_status() -> None:
    from localllm.http.openai_api import _error_body

    assert _error_body(errors.InvalidOptions("bad"))["error"]["type"] == "invalid_request_error"
    assert _error_body(errors.ModelNotFound(model="m"))["error"] == {
        "message": "model 'm' not found",
        "type": "not_found_error",
        "param": None,
        "code": "model_not_found",
    }
    assert _error_body(errors.QueueFull("busy"))["error"]["code"] == "overloaded"
    assert _error_body(errors.InsufficientMemory(needed=2, available=1))["error"]["type"] == "api_error"
