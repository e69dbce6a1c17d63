"""Streaming text helpers: UTF-8 split across tokens, stop sequences split across tokens."""

from __future__ import annotations

import pytest

from localllm.runner.text import StopMatcher, Utf8Stream

pytestmark = pytest.mark.fast


def test_multibyte_characters_split_across_pieces_are_never_emitted_half() -> None:
    text = "naïve café — 日本語 🙂!"
    data = text.encode("utf-8")
    for size in (1, 2, 3):
        stream = Utf8Stream()
        pieces = [stream.feed(data[i : i + size]) for i in range(0, len(data), size)] + [stream.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)


def test_invalid_bytes_become_replacement_characters_not_errors() -> None:
    stream = Utf8Stream()
    assert stream.feed(b"ok\xff") == "ok\ufffd"
    assert stream.feed(b"\xe6\x97") == ""
    assert stream.flush() == "\ufffd"


@pytest.mark.parametrize("cut", range(1, 18))
def test_stop_sequence_found_across_every_split(cut: int) -> None:
    text = "Hello there. END of story"
    matcher = StopMatcher(["END"])
    first, stopped_early = matcher.feed(text[:cut])
    rest, stopped = matcher.feed(text[cut:]) if not stopped_early else ("", True)
    assert stopped or stopped_early
    assert first + rest == "Hello there. "


def test_text_that_only_looks_like_a_stop_is_released() -> None:
    matcher = StopMatcher(["</answer>"])
    emitted, stopped = matcher.feed("a </ans")
    assert (emitted, stopped) == ("a ", False)
    emitted, stopped = matcher.feed("wer is 4")
    assert (emitted, stopped) == ("</answer is 4", False)
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins_and_flush_returns_held_text() -> None:
    matcher = StopMatcher(["\n\n", "User:"])
    assert matcher.feed("one User: two\n\n") == ("one ", True)
    matcher = StopMatcher(["User:"])
    assert matcher.feed("tail Us") == ("tail ", False)
    assert matcher.flush() == "Us"
