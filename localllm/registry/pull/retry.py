"""When a failed request is tried again, and when a pull gives up instead.

Only failures a retry can fix are retried: timeouts, a connection cut mid-transfer, and answers 429 and 5xx,
with exponential backoff (a ``Retry-After`` the server sends is honoured). A host that cannot be reached at
all (its name does not resolve, nothing listens, no route) fails the pull at once with `RegistryUnreachable`:
waiting a minute would not change the network. Every other answer fails at once too.

The retries of one request stop once they have taken `PullSettings.retry_timeout` seconds together, counted
from its first failure (``$LOCALLLM_PULL_TIMEOUT``, else `DEFAULT_PULL_TIMEOUT`). A try that moves the
download forward starts the count again, so a long download over a flaky line goes on while it progresses.
"""

from __future__ import annotations

import email.utils
import errno
import math
import os
import random
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs

from ...errors import InvalidRequest, PullError, RegistryUnreachable

if TYPE_CHECKING:
    from .download import PullSettings

__all__ = [
    "DEFAULT_PULL_TIMEOUT",
    "PULL_TIMEOUT_VARIABLE",
    "Origin",
    "Retries",
    "TransientError",
    "host_of",
    "pull_timeout_from_env",
    "retry_after_seconds",
    "unreachable_reason",
    "wait_to_retry",
]

#: Seconds a pull keeps retrying a failed request, all tries together, unless ``$LOCALLLM_PULL_TIMEOUT`` says.
DEFAULT_PULL_TIMEOUT = 60.0
PULL_TIMEOUT_VARIABLE = "LOCALLLM_PULL_TIMEOUT"

# Errors of a connection that never opened, for which no retry helps: no route to the host or its network.
_UNREACHABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


class TransientError(Exception):
    """A failure a retry can fix: try again after a backoff (at least `after` seconds, when the server asked)."""

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


def pull_timeout_from_env() -> float:
    """``$LOCALLLM_PULL_TIMEOUT`` in seconds (0 or more; 0: never retry), else `DEFAULT_PULL_TIMEOUT`."""
    value = os.environ.get(PULL_TIMEOUT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_PULL_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest(
            f"environment variable {PULL_TIMEOUT_VARIABLE} must be a number of seconds (0 or more), got {value!r}"
        )
    return seconds


def host_of(url: object) -> str:
    """``host`` or ``host:port`` of `url`."""
    parts = urlsplit(str(url))
    host = parts.hostname or str(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if ":" in host:
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it was raised from: HTTP libraries wrap the socket's own error, often twice."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        # urllib3 keeps the cause of its final error in `reason`, not in the chain.
        for linked in (error.__cause__, error.__context__, getattr(error, "reason", None)):
            if isinstance(linked, BaseException):
                pending.append(linked)


def unreachable_reason(exc: BaseException) -> str | None:
    """Why `exc` means its host cannot be reached at all (so retrying soon cannot help); None if it does not."""
    for error in _causes(exc):
        if isinstance(error, socket.gaierror):
            return "its name does not resolve (the DNS lookup failed)"
        if isinstance(error, ConnectionRefusedError):
            return "the connection was refused (nothing listens at that address)"
        if isinstance(error, OSError) and error.errno in _UNREACHABLE_ERRNOS:
            return "there is no route to it (the network is down or unreachable)"
    return None


def _failed_url(exc: BaseException, fallback: str) -> str:
    """The address of the request that failed (after redirects), else `fallback`."""
    try:
        request = getattr(exc, "request", None)
    except RuntimeError:  # an httpx error raised without its request
        request = None
    url = getattr(request, "url", None)
    return str(url) if url else fallback


def _proxy_variable(url: str) -> str | None:
    """The environment variable that sends requests for `url` through a proxy, if one does (as httpx reads them)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    bypass = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    for entry in (e.strip().lower().lstrip(".") for e in bypass.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    for scheme in (parts.scheme, "all"):
        for name in (f"{scheme}_proxy".upper(), f"{scheme}_proxy"):
            if os.environ.get(name):
                return name
    return None


@attrs.frozen
class Origin:
    """Where a pull gets a model from, so that an error can say which host could not be reached."""

    #: Who is there, for messages: "the registry", "the Hugging Face hub".
    label: str
    #: Its address (scheme://host).
    url: str
    #: What besides the network the user should check: "the host in the model name", "HF_ENDPOINT".
    hint: str

    def check(self, exc: BaseException, what: str, url: str | None = None) -> None:
        """Raise RegistryUnreachable when `exc` says a host cannot be reached at all; return otherwise.

        `url` is where the request went (the origin itself by default); the host named is the one whose
        connection failed, which after a redirect is the storage the origin sent the download to.
        """
        reason = unreachable_reason(exc)
        if reason is None:
            return
        failed = _failed_url(exc, url or self.url)
        host = host_of(failed)
        own = host_of(self.url)
        where = f"{self.label} {host}" if host == own else f"{host} (named by {self.label} {own})"
        checks = ["the network connection"]
        proxy = _proxy_variable(failed)
        if proxy is not None:
            checks.append(f"the proxy set in {proxy}")
        elif urlsplit(failed).hostname not in _LOOPBACK:  # a network that reaches out only through a proxy
            checks.append(f"whether it needs a proxy ({(urlsplit(failed).scheme or 'https').upper()}_PROXY)")
        advice = ", ".join(checks) + f" and {self.hint}"
        raise RegistryUnreachable(
            f"cannot pull '{what}': cannot reach {where}: {reason}. Check {advice}", host=host
        ) from exc


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a 429 or 503 answer asks for in its ``Retry-After`` header (seconds or a date), if any."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


class Retries:
    """The failed tries of one request in a row: whether to try again, and after how long."""

    def __init__(self, settings: PullSettings) -> None:
        self.settings = settings
        self.failures = 0
        self.first_failure = 0.0
        self.out_of_time = False

    def progressed(self) -> None:
        """The last try moved the download forward: the next failure starts a fresh count."""
        self.failures = 0

    def delay(self, retry_after: float | None = None) -> float | None:
        """Count a failed try; the seconds to wait before the next one, or None when it is time to give up.

        It gives up when `max_retries` retries were made, or when waiting would take the tries past
        `retry_timeout` seconds since the first failure (a `retry_after` the server asked for included).
        """
        now = time.monotonic()
        if self.failures == 0:
            self.first_failure = now
        self.failures += 1
        limit = self.settings.max_retries
        if limit is not None and self.failures > limit:
            return None
        wait = _backoff_delay(self.settings, self.failures)
        if retry_after is not None:
            wait = max(wait, retry_after)
        if now + wait - self.first_failure > self.settings.retry_timeout:
            self.out_of_time = True
            return None
        return wait

    def gave_up(self) -> str:
        """How the tries ended, for the error: ``gave up after 4 tries in 9 s (...)``."""
        tries = f"{self.failures} tr{'ies' if self.failures != 1 else 'y'}"
        elapsed = time.monotonic() - self.first_failure
        text = f"gave up after {tries} in {elapsed:.0f} s"
        if self.out_of_time:
            text += (
                f" (a pull retries for {self.settings.retry_timeout:g} s; set {PULL_TIMEOUT_VARIABLE} to wait longer)"
            )
        return text


def _backoff_delay(settings: PullSettings, failures: int) -> float:
    delay = min(settings.backoff * (2 ** max(failures - 1, 0)), settings.max_backoff)
    return delay * (0.5 + random.random())


def wait_to_retry(delay: float, cancel: threading.Event | None, what: str) -> None:
    """Wait `delay` seconds before the next try; PullError at once if the pull is cancelled meanwhile."""
    if cancel is None:
        time.sleep(delay)
        return
    if cancel.wait(delay):
        raise PullError(f"pull of '{what}' was cancelled")
