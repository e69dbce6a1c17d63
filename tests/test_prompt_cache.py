"""The prompt cache: longest-prefix lookup by block hashes, RAM and disk bounds, files that survive a restart
and files that must never be trusted. Made-up tokens and states; no model needed."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from fakes import TIMEOUT, FakeBackend, FakeContext, ScriptedBackend, params, reply, serving
from fakes import tokens as text_tokens

from localllm import Engine
from localllm.runner import prompt_cache
from localllm.runner.prompt_cache import CacheHit, PromptCache
from localllm.runner.protocol import SequenceResult

pytestmark = pytest.mark.fast

KEY = "model-a"
BASE = list(range(1000, 1200))


def state_of(tokens: Sequence[int], size: int = 100) -> bytes:
    """A state that tells which tokens it was saved for."""
    seed = hashlib.sha256(repr(list(tokens)).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def small(max_bytes: int = 10_000, directory: Path | None = None, max_disk_bytes: int | None = None) -> PromptCache:
    """Blocks of 8 and hits from 8 tokens, so that tests can use short token lists."""
    return PromptCache(max_bytes, directory=directory, max_disk_bytes=max_disk_bytes, block_size=8, min_tokens=8)


def holds(cache: PromptCache, tokens: Sequence[int]) -> bool:
    """Whether a lookup of `tokens` finds the entry saved for exactly these tokens."""
    hit = cache.lookup(KEY, tokens)
    return hit is not None and hit.tokens == tuple(tokens)


def files(directory: Path) -> list[Path]:
    """The cache's files in `directory`, its key aside."""
    return sorted(path for path in directory.iterdir() if path.name != "prompt-cache.key")


def test_lookup_finds_the_longest_cached_prefix() -> None:
    cache = small()
    short, long = BASE[:24], BASE[:40]
    branch = [*BASE[:20], *range(5000, 5030)]
    other = list(range(7000, 7050))
    for tokens in ([*short, 1], [*long, 2], branch, other):  # the 1 and 2 keep `long` from extending `short`
        cache.put(KEY, tokens, state_of(tokens))
    assert len(cache) == 4

    hit = cache.lookup(KEY, [*BASE[:60]])
    assert hit == CacheHit(tuple([*long, 2]), state_of([*long, 2]), 40)

    hit = cache.lookup(KEY, [*BASE[:20], *range(5000, 5010), 1, 2, 3])
    assert hit == CacheHit(tuple(branch), state_of(branch), 30)

    hit = cache.lookup(KEY, [*BASE[:24], 1, 99])
    assert hit is not None and hit.tokens == tuple([*short, 1]) and hit.common == 25

    assert cache.lookup(KEY, list(range(9000, 9100))) is None


def test_a_prefix_shorter_than_min_tokens_is_a_miss() -> None:
    cache = PromptCache(10_000, block_size=8, min_tokens=20)
    cache.put(KEY, BASE[:19], state_of(BASE[:19]))
    assert len(cache) == 0  # too short to be worth keeping
    cache.put(KEY, BASE[:40], state_of(BASE[:40]))

    assert cache.lookup(KEY, [*BASE[:19], -1, *BASE[20:40]]) is None
    assert cache.lookup(KEY, BASE[:19]) is None
    hit = cache.lookup(KEY, [*BASE[:20], -1])
    assert hit is not None and hit.common == 20


def test_min_tokens_above_the_block_size_still_finds_the_longest_prefix() -> None:
    # Hits need 20 tokens, blocks are 8: a 2-block match (16 tokens) must not hide a 20-token one.
    cache = PromptCache(10_000, block_size=8, min_tokens=20)
    near = [*BASE[:18], *range(3000, 3030)]
    far = [*BASE[:22], *range(4000, 4030)]
    cache.put(KEY, near, state_of(near))
    cache.put(KEY, far, state_of(far))
    hit = cache.lookup(KEY, BASE[:60])
    assert hit is not None and hit.tokens == tuple(far) and hit.common == 22


def test_a_hit_can_end_inside_a_block_and_be_longer_than_the_prompt() -> None:
    cache = small()
    cache.put(KEY, BASE[:40], state_of(BASE[:40]))

    hit = cache.lookup(KEY, [*BASE[:27], -5, -6, -7])  # diverges inside the fourth block
    assert hit is not None and hit.common == 27 and hit.tokens == tuple(BASE[:40])

    hit = cache.lookup(KEY, BASE[:21])  # the prompt ends inside a block, the entry goes on
    assert hit is not None and hit.common == 21 and len(hit.tokens) == 40

    hit = cache.lookup(KEY, BASE[:40])
    assert hit is not None and hit.common == 40


def test_keys_are_isolated() -> None:
    cache = small()
    cache.put("model-a", BASE[:40], b"a" * 100)
    cache.put("model-b", BASE[:40], b"b" * 50)
    assert len(cache) == 2
    hit_a, hit_b = cache.lookup("model-a", BASE[:40]), cache.lookup("model-b", BASE[:40])
    assert hit_a is not None and hit_a.state == b"a" * 100
    assert hit_b is not None and hit_b.state == b"b" * 50
    assert cache.lookup("model-c", BASE[:40]) is None
    assert not cache.covers("model-c", BASE[:40])
    assert cache.size_bytes("model-a") == 100 and cache.size_bytes("model-b") == 50 and cache.size_bytes() == 150


def test_covered_puts_are_skipped_and_extending_puts_replace() -> None:
    cache = small()
    cache.put(KEY, BASE[:40], b"first" * 20)

    assert cache.covers(KEY, BASE[:40]) and cache.covers(KEY, BASE[:13])
    assert not cache.covers(KEY, BASE[:41]) and not cache.covers(KEY, [*BASE[:39], -1])
    cache.put(KEY, BASE[:40], b"again" * 20)
    cache.put(KEY, BASE[:30], b"shorter" * 20)
    assert len(cache) == 1
    hit = cache.lookup(KEY, BASE[:40])
    assert hit is not None and hit.state == b"first" * 20

    cache.put(KEY, BASE[:60], b"longer" * 10)
    assert len(cache) == 1 and cache.size_bytes() == 60
    hit = cache.lookup(KEY, BASE[:40])
    assert hit is not None and hit.tokens == tuple(BASE[:60]) and hit.state == b"longer" * 10

    # A branch does not extend the entry: both stay.
    cache.put(KEY, [*BASE[:50], -1], b"branch")
    assert len(cache) == 2


def test_least_recently_used_states_leave_ram_first() -> None:
    cache = small(max_bytes=300)
    entries = [[*BASE[:16], n, *range(n * 100, n * 100 + 10)] for n in range(4)]
    for tokens in entries[:3]:
        cache.put(KEY, tokens, state_of(tokens, 100))
    assert cache.size_bytes() == 300

    assert cache.lookup(KEY, entries[0]) is not None  # the oldest, used again
    cache.put(KEY, entries[3], state_of(entries[3], 100))

    assert cache.size_bytes() == 300 and len(cache) == 3
    assert not holds(cache, entries[1])
    for tokens in (entries[0], entries[2], entries[3]):
        hit = cache.lookup(KEY, tokens)
        assert hit is not None and hit.tokens == tuple(tokens) and hit.state == state_of(tokens, 100)


def test_a_state_larger_than_the_ram_bound_is_not_kept() -> None:
    cache = small(max_bytes=100)
    cache.put(KEY, BASE[:40], b"x" * 101)
    assert len(cache) == 0 and cache.size_bytes() == 0 and cache.lookup(KEY, BASE[:40]) is None
    cache.put(KEY, BASE[:40], b"x" * 100)
    assert cache.size_bytes() == 100

    nothing = small(max_bytes=0)
    nothing.put(KEY, BASE[:40], b"x")
    assert len(nothing) == 0 and nothing.lookup(KEY, BASE[:40]) is None


def test_entries_survive_a_restart_on_disk(tmp_path: Path) -> None:
    first = small(directory=tmp_path)
    assert first.persistent
    one, two = BASE[:40], [*BASE[:10], *range(5000, 5030)]
    first.put(KEY, one, state_of(one, 1000))
    first.put(KEY, two, state_of(two, 1000))
    first.close()

    written = files(tmp_path)
    assert len(written) == 2 and all(path.suffix == ".kvcache" for path in written)
    assert all(path.read_bytes().startswith(prompt_cache.MAGIC) for path in written)

    # A new process; RAM-less so the states must come from the files.
    second = small(max_bytes=0, directory=tmp_path)
    assert len(second) == 2
    hit = second.lookup(KEY, [*BASE[:45]])
    assert hit == CacheHit(tuple(one), state_of(one, 1000), 40)
    hit = second.lookup(KEY, two)
    assert hit == CacheHit(tuple(two), state_of(two, 1000), 40)
    assert second.lookup("another-model", one) is None

    # With RAM to spare, a disk hit is kept in RAM.
    third = small(directory=tmp_path)
    assert third.size_bytes() == 0
    assert third.lookup(KEY, one) is not None and third.size_bytes() == 1000


def test_a_disk_hit_too_large_for_ram_leaves_ram_alone(tmp_path: Path) -> None:
    writer = small(max_bytes=0, directory=tmp_path)
    big, little = BASE[:40], list(range(5000, 5040))
    writer.put(KEY, big, b"B" * 1000)
    writer.put(KEY, little, b"L" * 400)

    cache = small(max_bytes=500, directory=tmp_path)
    assert holds(cache, little) and cache.size_bytes() == 400
    hit = cache.lookup(KEY, big)
    assert hit is not None and hit.state == b"B" * 1000
    assert cache.size_bytes() == 400
    assert cache.lookup(KEY, little) is not None


def test_a_replaced_entry_loses_its_file(tmp_path: Path) -> None:
    cache = small(directory=tmp_path)
    cache.put(KEY, BASE[:40], b"old")
    cache.put(KEY, BASE[:60], b"new")
    (path,) = files(tmp_path)
    assert path.read_bytes().endswith(b"new")
    cache.close()
    restarted = small(directory=tmp_path)
    hit = restarted.lookup(KEY, BASE[:40])
    assert hit is not None and hit.state == b"new"


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _foreign_magic(path: Path) -> None:
    path.write_bytes(b"GGUF" + path.read_bytes()[4:])


def _newer_version(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(prompt_cache.MAGIC)] += 1
    path.write_bytes(bytes(data))


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(prompt_cache.MAGIC) + 8] = ord("!")
    path.write_bytes(bytes(data))


def _extra_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


@pytest.mark.parametrize(
    ("damage", "seen_on_start"),
    [
        (_flip_last_byte, False),  # only reading the state shows it
        (_truncate, True),  # the headers and the file sizes show the rest
        (_extra_bytes, True),
        (_foreign_magic, True),
        (_newer_version, True),
        (_garbage_header, True),
    ],
)
def test_a_damaged_file_is_removed_and_never_returned(
    tmp_path: Path, damage: Callable[[Path], None], seen_on_start: bool, caplog: pytest.LogCaptureFixture
) -> None:
    cache = small(directory=tmp_path)
    cache.put(KEY, BASE[:40], state_of(BASE[:40], 500))
    cache.close()
    (path,) = files(tmp_path)
    damage(path)

    with caplog.at_level(logging.WARNING, logger="localllm.runner"):
        restarted = small(max_bytes=0, directory=tmp_path)
        assert path.exists() != seen_on_start and len(restarted) == (0 if seen_on_start else 1)
        assert restarted.lookup(KEY, BASE[:40]) is None
    assert not path.exists()
    assert len(restarted) == 0
    assert any("discarding" in record.getMessage() for record in caplog.records)


def test_a_file_damaged_while_indexed_is_caught_on_reading(tmp_path: Path) -> None:
    cache = small(max_bytes=0, directory=tmp_path)
    cache.put(KEY, BASE[:40], state_of(BASE[:40], 500))
    (path,) = files(tmp_path)
    _truncate(path)
    assert cache.lookup(KEY, BASE[:40]) is None and not path.exists() and len(cache) == 0


def test_a_file_whose_name_does_not_match_its_contents_is_removed(tmp_path: Path) -> None:
    cache = small(directory=tmp_path)
    cache.put(KEY, BASE[:40], b"state")
    cache.close()
    (path,) = files(tmp_path)
    moved = path.with_name("0" * 64 + ".kvcache")
    path.rename(moved)

    restarted = small(directory=tmp_path)
    assert restarted.lookup(KEY, BASE[:40]) is None and files(tmp_path) == []


def test_a_file_replaced_behind_the_index_is_checked_against_it(tmp_path: Path) -> None:
    cache = small(max_bytes=0, directory=tmp_path)
    other = [*BASE[:8], *range(600, 640)]
    cache.put(KEY, other, b"other")
    (other_file,) = files(tmp_path)
    cache.put(KEY, BASE[:40], b"state")
    (this_file,) = set(files(tmp_path)) - {other_file}
    # Another entry's valid file under this entry's name: its header no longer says what was indexed.
    shutil.copyfile(other_file, this_file)

    # The damaged entry goes; the next best entry (8 shared tokens) answers instead.
    assert cache.lookup(KEY, BASE[:40]) == CacheHit(tuple(other), b"other", 8)
    assert files(tmp_path) == [other_file] and len(cache) == 1


def test_leftover_temp_files_are_removed_on_start(tmp_path: Path) -> None:
    cache = small(directory=tmp_path)
    cache.put(KEY, BASE[:40], b"state")
    cache.close()
    (path,) = files(tmp_path)
    fd, leftover = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=tmp_path)
    os.write(fd, path.read_bytes()[:20])  # a writer died half-way
    os.close(fd)
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("not ours")

    restarted = small(directory=tmp_path)
    assert not Path(leftover).exists()
    assert unrelated.exists()  # only the cache's own files are touched
    assert restarted.lookup(KEY, BASE[:40]) is not None


def test_the_disk_bound_evicts_the_least_recently_used_file(tmp_path: Path) -> None:
    entries = [list(range(6000 + 100 * n, 6030 + 100 * n)) for n in range(3)]  # unrelated, same sizes
    probe = small(directory=tmp_path / "probe")
    probe.put(KEY, entries[0], b"s" * 1000)
    (sample,) = files(tmp_path / "probe")
    file_size = sample.stat().st_size

    cache = small(max_bytes=0, directory=tmp_path / "cache", max_disk_bytes=2 * file_size + 10)
    cache.put(KEY, entries[0], b"0" * 1000)
    cache.put(KEY, entries[1], b"1" * 1000)
    assert cache.lookup(KEY, entries[0]) is not None  # used again: now entries[1] is the oldest
    cache.put(KEY, entries[2], b"2" * 1000)

    assert len(files(tmp_path / "cache")) == 2 and len(cache) == 2
    assert not holds(cache, entries[1])
    for n in (0, 2):
        hit = cache.lookup(KEY, entries[n])
        assert hit is not None and hit.state == str(n).encode() * 1000


@pytest.mark.parametrize("oldest", [0, 1, 2])
def test_after_a_restart_the_oldest_file_by_mtime_goes_first(tmp_path: Path, oldest: int) -> None:
    entries = [list(range(6000 + 100 * n, 6030 + 100 * n)) for n in range(3)]  # unrelated, same sizes
    cache = small(directory=tmp_path)
    for tokens in entries:
        cache.put(KEY, tokens, state_of(tokens, 1000))
    cache.close()
    paths = {path.read_bytes()[-1000:]: path for path in files(tmp_path)}
    by_entry = [paths[state_of(tokens, 1000)] for tokens in entries]
    middle, newest = (oldest + 1) % 3, (oldest + 2) % 3
    for age, n in enumerate((oldest, middle, newest)):
        os.utime(by_entry[n], (1_000_000 + age, 1_000_000 + age))
    size = by_entry[0].stat().st_size

    restarted = small(max_bytes=0, directory=tmp_path, max_disk_bytes=2 * size)
    assert [path.exists() for path in by_entry] == [n != oldest for n in range(3)]
    assert len(restarted) == 2 and not holds(restarted, entries[oldest])

    # A hit marks the file as used, for the next start's eviction.
    assert holds(restarted, entries[middle])
    assert by_entry[middle].stat().st_mtime > by_entry[newest].stat().st_mtime


def test_a_vanished_directory_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "cache"
    cache = small(max_bytes=1000, directory=directory)
    cache.put(KEY, BASE[:40], b"on disk")
    shutil.rmtree(directory)

    with caplog.at_level(logging.WARNING, logger="localllm.runner"):
        cache.put(KEY, [*BASE[:8], *range(600, 640)], b"in ram")
        hit = cache.lookup(KEY, [*BASE[:8], *range(600, 640)])
        assert hit is not None and hit.state == b"in ram"
    assert not cache.persistent
    assert any("cannot write" in record.getMessage() for record in caplog.records)

    disk_only = small(max_bytes=0, directory=tmp_path / "other")
    disk_only.put(KEY, BASE[:40], b"on disk")
    shutil.rmtree(tmp_path / "other")
    assert disk_only.lookup(KEY, BASE[:40]) is None and len(disk_only) == 0


def test_an_unusable_directory_leaves_a_ram_cache(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    cache = small(directory=not_a_directory)
    assert not cache.persistent
    cache.put(KEY, BASE[:40], b"state")
    assert cache.lookup(KEY, BASE[:40]) is not None


@pytest.mark.parametrize("failing", ["mkstemp", "fsync", "replace"])
def test_write_errors_do_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    cache = small(directory=tmp_path)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC if failing == "fsync" else errno.EACCES, f"{failing} failed")

    target = {"mkstemp": (prompt_cache.tempfile, "mkstemp"), "fsync": (os, "fsync"), "replace": (os, "replace")}
    monkeypatch.setattr(*target[failing], fail)
    cache.put(KEY, BASE[:40], b"state")
    monkeypatch.undo()

    assert files(tmp_path) == []  # no temp file left behind either
    assert not cache.persistent
    hit = cache.lookup(KEY, BASE[:40])
    assert hit is not None and hit.state == b"state"


def test_hash_collisions_are_caught_by_comparing_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    real_blake2b = hashlib.blake2b

    def colliding(data: bytes = b"", *, digest_size: int, person: bytes) -> object:
        if person == b"localllm-name":  # file names stay distinct: only the index collides
            return real_blake2b(data, digest_size=digest_size, person=person)
        return real_blake2b(b"every index key alike", digest_size=16)

    monkeypatch.setattr(prompt_cache.hashlib, "blake2b", colliding)
    cache = small()
    a, b = BASE[:40], list(range(5000, 5040))
    cache.put(KEY, a, b"a")
    cache.put(KEY, b, b"b")
    assert len(cache) == 2  # neither "covers" the other
    assert cache.lookup(KEY, [*a, 1]) == CacheHit(tuple(a), b"a", 40)
    assert cache.lookup(KEY, b) == CacheHit(tuple(b), b"b", 40)
    assert cache.lookup(KEY, list(range(9000, 9040))) is None
    assert cache.lookup("model-b", a) is None


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads far more often than usual, so that unguarded updates would interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.parametrize("bounded", [False, True])
def test_threads_share_one_cache(tmp_path: Path, busy_switching: None, bounded: bool) -> None:
    threads_n, per_thread = 8, 40
    cache = small(max_bytes=50 * 100 if bounded else 10**9, directory=tmp_path if bounded else None)
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def tokens_of(thread: int, n: int) -> list[int]:
        return [*BASE[:16], thread, *BASE[16 : 16 + n % 7], n, *range(n, n + 10)]

    def work(thread: int) -> None:
        rng = random.Random(thread)
        try:
            start.wait()
            for n in range(per_thread):
                tokens = tokens_of(thread, n)
                cache.put(KEY, tokens, state_of(tokens))
                probe = tokens_of(rng.randrange(threads_n), rng.randrange(per_thread))
                hit = cache.lookup(KEY, probe)
                if hit is not None:  # whatever it is, it is consistent
                    assert hit.state == state_of(hit.tokens)
                    assert list(hit.tokens[: hit.common]) == probe[: hit.common]
                    assert hit.common >= 8
                cache.covers(KEY, probe)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(thread,)) for thread in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []

    everything = [tokens_of(thread, n) for thread in range(threads_n) for n in range(per_thread)]
    if not bounded:
        assert len(cache) == len(everything)
        assert cache.size_bytes() == 100 * len(everything) == cache.size_bytes(KEY)
    assert cache.size_bytes() <= (50 * 100 if bounded else 10**9)
    held = 0
    for tokens in everything:
        hit = cache.lookup(KEY, tokens)
        if hit is not None and hit.tokens == tuple(tokens):
            held += 1
            assert hit.state == state_of(tokens)
    assert held == (len(everything) if not bounded else len(cache))


def test_close_is_idempotent_and_ends_everything(tmp_path: Path) -> None:
    cache = small(directory=tmp_path)
    cache.put(KEY, BASE[:40], b"state")
    cache.close()
    cache.close()
    assert len(cache) == 0 and cache.size_bytes() == 0 and not cache.persistent
    assert cache.lookup(KEY, BASE[:40]) is None and not cache.covers(KEY, BASE[:40])
    cache.put(KEY, BASE[:60], b"more")
    assert len(cache) == 0
    assert len(files(tmp_path)) == 1  # the file stays for the next start


def test_default_blocks_find_a_long_shared_prefix() -> None:
    cache = PromptCache(1 << 20)
    system = list(range(3000))
    cache.put(KEY, [*system, *range(10_000, 10_100)], b"conversation")
    cache.put(KEY, system[:63], b"too short")
    assert len(cache) == 1
    hit = cache.lookup(KEY, [*system, *range(10_000, 10_050), 7])
    assert hit is not None and hit.common == 3050 and hit.state == b"conversation"
    assert cache.lookup(KEY, [*system[:63], -1, *system[64:]]) is None


# -- trusting only what this engine wrote -------------------------------------------

# A prompt of 82 fake tokens (one per character) whose reply continues the alphabet after its "q".
PROMPT = text_tokens("You are a helpful assistant. " * 2 + "Be brief, be kind, be right. " + "abq")
HOSTILE = json.dumps([[2**31 - 1, ord("!")]]).encode()  # a state whose first position llama.cpp cannot go on from


def keyed(directory: Path, key_file: Path, max_bytes: int = 1 << 20) -> PromptCache:
    return PromptCache(max_bytes, directory=directory, key_file=key_file, block_size=8, min_tokens=8)


async def answer(cache: PromptCache | None, prompt: list[int] = PROMPT) -> tuple[str, SequenceResult, FakeBackend]:
    """A fake runner's three-token reply to `prompt`, starting from whatever `cache` holds."""
    with serving(cache, num_parallel=1, num_ctx=512) as (runner, backend):
        text, result = await reply(runner.submit(prompt, params(num_predict=3)))
        # The runner is still sound: another request after this one is answered in full.
        assert (await reply(runner.submit(text_tokens("xy"), params(num_predict=2))))[0] == "z"
    return text, result, backend


def cache_key() -> str:
    """The key the fake runners save their states under."""
    with serving(num_parallel=1, num_ctx=512) as (runner, _):
        return runner.cache_key


def test_a_key_is_made_once_readable_by_its_owner_only_and_then_kept(tmp_path: Path) -> None:
    key_file = tmp_path / "home" / "prompt-cache.key"
    first = keyed(tmp_path / "cache", key_file)
    assert first.persistent and key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    secret = key_file.read_bytes()
    first.put(KEY, BASE[:40], b"state")
    again = keyed(tmp_path / "cache", key_file, max_bytes=0)
    assert key_file.read_bytes() == secret and holds(again, BASE[:40])
    assert prompt_cache.load_key(key_file) == secret


@pytest.mark.parametrize("spoil", ["readable by others", "short"])
def test_a_key_others_could_have_written_is_not_used(
    tmp_path: Path, spoil: str, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "prompt-cache.key"
    keyed(tmp_path / "cache", key_file).put(KEY, BASE[:40], b"state")
    if spoil == "short":
        key_file.write_bytes(b"0" * 31)
    else:
        key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="localllm.runner"):
        cache = keyed(tmp_path / "cache", key_file)
    assert not cache.persistent and len(cache) == 0  # RAM only: nothing on disk is trusted or written
    assert any("RAM only" in record.getMessage() for record in caplog.records)
    cache.put(KEY, BASE[:40], b"in ram")
    assert holds(cache, BASE[:40])


def test_an_entry_signed_with_another_key_is_ignored_and_removed(tmp_path: Path) -> None:
    # Consistent in every way a hash can tell (magic, sizes, name, state hash): only the key differs.
    theirs = keyed(tmp_path / "cache", tmp_path / "their.key")
    theirs.put(KEY, BASE[:40], b"injected context")
    (planted,) = files(tmp_path / "cache")

    ours = keyed(tmp_path / "cache", tmp_path / "our.key")
    assert len(ours) == 0 and ours.lookup(KEY, BASE[:40]) is None and not planted.exists()


async def test_a_crafted_entry_is_ignored_and_the_request_answers_as_without_a_cache(tmp_path: Path) -> None:
    directory, key_file = tmp_path / "cache", tmp_path / "home" / "prompt-cache.key"
    # Written by someone without the key: a hostile state, filed under the prompt's tokens with a valid
    # header, a matching file name and a state checksum that agrees.
    secret = os.urandom(32)
    directory.mkdir()
    data = prompt_cache._encode_header(secret, cache_key(), PROMPT, HOSTILE) + HOSTILE
    planted = directory / f"{prompt_cache._entry_name(cache_key(), PROMPT)}.kvcache"
    planted.write_bytes(data)

    expected, _, _ = await answer(None)
    text, result, backend = await answer(keyed(directory, key_file))
    assert (text, result.prompt_cached_count) == (expected, 0) == ("rst", 0)
    assert backend.context.restores == [] and not planted.exists()


async def test_entries_copied_from_another_home_are_not_restored(tmp_path: Path, smollm2_path: Path) -> None:
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    backend = ScriptedBackend(reply="fine")
    options = {"temperature": 0, "num_predict": 2, "num_ctx": 1024}
    text = "You are a helpful assistant who answers every question in one short word. " * 3
    async with Engine(home_a, backend=backend, num_parallel=1, prompt_cache=True) as engine:
        first = await engine.generate(str(smollm2_path), text, raw=True, options=options)
    async with Engine(home_a, backend=backend, num_parallel=1, prompt_cache=True) as engine:
        again = await engine.generate(str(smollm2_path), text, raw=True, options=options)
    assert first.prompt_cached_count == 0 and again.prompt_cached_count == again.prompt_eval_count - 1

    entries = list((home_a / "cache" / "prompts").glob("*.kvcache"))
    assert entries
    (home_b / "cache" / "prompts").mkdir(parents=True)
    for entry in entries:
        shutil.copy(entry, home_b / "cache" / "prompts" / entry.name)
    async with Engine(home_b, backend=backend, num_parallel=1, prompt_cache=True) as engine:
        copied = await engine.generate(str(smollm2_path), text, raw=True, options=options)
    assert copied.prompt_cached_count == 0 and copied.response == first.response == again.response == "fi"
    # Each copy was removed; what stands under its name now is home b's own state, signed with its key.
    for entry in entries:
        mine = home_b / "cache" / "prompts" / entry.name
        assert not mine.exists() or mine.read_bytes() != entry.read_bytes()


def _fail_restore(context: FakeContext) -> None:
    context.failing_restores = "refuse"


def _raise_on_restore(context: FakeContext) -> None:
    context.failing_restores = "raise"


def _fail_next_decode(status: int) -> Callable[[FakeContext], None]:
    def fail(context: FakeContext) -> None:
        context.statuses.append(status)  # the next decode is the first one after the restore

    return fail


@pytest.mark.parametrize(
    ("state", "break_context"),
    [
        pytest.param(None, _fail_restore, id="refused"),
        pytest.param(None, _raise_on_restore, id="unreadable"),
        pytest.param(HOSTILE, None, id="first position 2**31-1"),
        pytest.param(b"[]", None, id="no cells"),
        pytest.param(json.dumps([[pos, ord("a")] for pos in range(200)]).encode(), None, id="more cells"),
        pytest.param(None, _fail_next_decode(1), id="first decode finds no room"),
        pytest.param(None, _fail_next_decode(-1), id="first decode refused"),
    ],
)
async def test_an_entry_that_fails_to_restore_is_dropped_and_the_request_still_succeeds(
    tmp_path: Path, state: bytes | None, break_context: Callable[[FakeContext], None] | None
) -> None:
    directory, key_file = tmp_path / "cache", tmp_path / "prompt-cache.key"
    cache = keyed(directory, key_file)
    prefix = PROMPT[:-1]
    # Saved by this engine (signed with its key), yet unusable in the slot.
    good = json.dumps([[pos, token] for pos, token in enumerate(prefix)]).encode()
    cache.put(cache_key(), prefix, state if state is not None else good)
    assert len(files(directory)) == 1

    expected, _, _ = await answer(None)
    bad = state if state is not None else good
    with serving(cache, num_parallel=1, num_ctx=512) as (runner, backend):
        if break_context is not None:
            break_context(backend.context)
        text, result = await reply(runner.submit(PROMPT, params(num_predict=3)))
        assert (text, result.prompt_cached_count) == (expected, 0)  # evaluated from scratch, answered in full
        hit = cache.lookup(runner.cache_key, prefix)
        assert hit is None or hit.state != bad  # the failed state is gone (what the request left may be saved)
        assert (await reply(runner.submit(text_tokens("xy"), params(num_predict=2))))[0] == "z"
    assert not any(path.read_bytes().endswith(bad) for path in files(directory))


def test_a_fifo_named_like_an_entry_neither_hangs_nor_goes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fifo = tmp_path / ("f" * 64 + ".kvcache")
    os.mkfifo(fifo)
    opened: list[PromptCache] = []
    with caplog.at_level(logging.WARNING, logger="localllm.runner"):
        # In a thread, so that a regression fails the test instead of hanging it.
        worker = threading.Thread(target=lambda: opened.append(keyed(tmp_path, tmp_path / "k" / "key")), daemon=True)
        worker.start()
        worker.join(TIMEOUT)
    assert not worker.is_alive(), "opening a folder with a FIFO in it hung"
    (cache,) = opened
    assert any("FIFO" in record.getMessage() for record in caplog.records)
    cache.put(KEY, BASE[:40], b"state")
    assert holds(cache, BASE[:40])
    cache.close()
    assert fifo.exists()  # not the cache's to remove


@pytest.mark.parametrize("claim", ["header", "tokens"])
def test_a_header_larger_than_the_bound_is_rejected_unread(tmp_path: Path, claim: str) -> None:
    length, count = (1 << 30, 0) if claim == "header" else (10, 1 << 30)
    path = tmp_path / ("e" * 64 + ".kvcache")
    path.write_bytes(prompt_cache.MAGIC + struct.pack("<III", prompt_cache.FORMAT_VERSION, length, count))
    cache = keyed(tmp_path, tmp_path / "key")
    assert len(cache) == 0 and not path.exists()


def test_three_caches_sharing_a_folder_leave_each_others_temp_files_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    first = keyed(tmp_path / "cache", key_file)
    others: list[PromptCache] = []
    real_fsync = os.fsync

    def open_the_others_meanwhile(fd: int) -> None:
        # The first cache's state is in its temp file, not yet renamed: two more caches start on the folder.
        real_fsync(fd)
        if not others:
            others.append(keyed(tmp_path / "cache", key_file))
            others.append(keyed(tmp_path / "cache", key_file))
            others[0].put(KEY, [*BASE[:8], *range(600, 640)], b"second")

    monkeypatch.setattr(prompt_cache.os, "fsync", open_the_others_meanwhile)
    first.put(KEY, BASE[:40], b"first")
    monkeypatch.undo()

    assert len(others) == 2 and first.persistent and all(cache.persistent for cache in others)
    assert len(files(tmp_path / "cache")) == 2 and not any(path.name.endswith(".tmp") for path in files(tmp_path))
    fourth = keyed(tmp_path / "cache", key_file, max_bytes=0)
    assert holds(fourth, BASE[:40]) and holds(fourth, [*BASE[:8], *range(600, 640)])


def test_a_temp_file_is_removed_only_once_its_writer_is_gone(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        in_flight = tmp_path / f".{'a' * 64}.{writer.pid}.x1y2.tmp"
        in_flight.write_bytes(b"half a state")
        keyed(tmp_path, tmp_path / "key")
        assert in_flight.exists()  # its writer is alive: it may rename it any moment
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait()
    keyed(tmp_path, tmp_path / "key")
    assert not in_flight.exists()


def test_three_processes_share_one_folder_and_one_key(tmp_path: Path) -> None:
    # Each process makes the key if it is first, writes entries and, between them, opens the folder again
    # (as a new runner child would), which must neither delete the others' temp files nor stop their writes.
    script = """
import sys
from pathlib import Path
from localllm.runner.prompt_cache import PromptCache

folder, key, who = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cache = PromptCache(0, directory=folder, key_file=key, block_size=8, min_tokens=8)
for n in range(30):
    cache.put("model", [who, n, *range(100, 120)], bytes([who]) * 20_000)
    PromptCache(0, directory=folder, key_file=key, block_size=8, min_tokens=8)
print(cache.persistent)
"""
    folder, key_file = tmp_path / "cache", tmp_path / "home" / "prompt-cache.key"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(folder), str(key_file), str(who)], stdout=subprocess.PIPE, text=True
        )
        for who in range(3)
    ]
    outputs = [writer.communicate(timeout=120)[0].split() for writer in writers]
    assert outputs == [["True"]] * 3 and all(writer.returncode == 0 for writer in writers)

    cache = PromptCache(0, directory=folder, key_file=key_file, block_size=8, min_tokens=8)
    assert len(cache) == 90 and not [path for path in folder.iterdir() if path.name.endswith(".tmp")]
    for who in range(3):
        hit = cache.lookup("model", [who, 29, *range(100, 120)])
        assert hit is not None and hit.state == bytes([who]) * 20_000
