"""Drafting for speculative decoding: guesses at a sequence's next tokens, cheaper than the model's own.

The worker puts a sequence's next token and its draft into one batch and keeps the drafted tokens the
model itself would have chosen, so a good guess yields several tokens for one decode. Two drafters:

- `NgramDrafter` (prompt lookup): the tokens that followed the last earlier occurrence of the
  sequence's most recent few tokens. Free, and good where the output repeats its input (edits,
  summaries quoting the source, code).
- `ModelDrafter`: a small model with the same vocabulary, run greedily on a context of its own with
  one sequence per slot of the target, every slot drafted in the same decodes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs
import numpy as np

from ..errors import InvalidOptions
from ..options import Options
from .backend import Backend, Model
from .protocol import LoadConfig

__all__ = ["DraftModelMismatch", "Drafter", "ModelDrafter", "NgramDrafter", "check_same_vocabulary", "make_drafter"]

logger = logging.getLogger("localllm.runner")


class DraftModelMismatch(InvalidOptions):
    """The draft model cannot draft for this model: their vocabularies differ."""


class Drafter(Protocol):
    """Proposes draft tokens for sequences, keyed by sequence (slot) id."""

    def propose(self, histories: Mapping[int, Sequence[int]], limits: Mapping[int, int]) -> dict[int, list[int]]:
        """Up to `limits[seq]` tokens likely to follow each history (every token the sequence holds,
        then its next token). A sequence may get fewer tokens, or none."""
        ...

    def close(self) -> None: ...


def make_drafter(
    backend: Backend, target: Model, config: LoadConfig, *, gpu_layers: int, tensor_split: Sequence[float] | None
) -> Drafter | None:
    """The drafter a load configuration asks for: its draft model, else prompt lookup, else none."""
    if config.draft_model_path:
        return ModelDrafter(backend, target, config, gpu_layers=gpu_layers, tensor_split=tensor_split)
    if config.prompt_lookup:
        return NgramDrafter()
    return None


# -- prompt lookup ----------------------------------------------------------------------


@attrs.define
class NgramDrafter:
    """Drafts what followed the most recent earlier occurrence of the history's last n tokens.

    Longer n-grams are tried first (a longer match predicts better); a match of fewer than
    `min_ngram` tokens is too weak to be worth verifying.
    """

    max_ngram: int = 4
    min_ngram: int = 2

    def propose(self, histories: Mapping[int, Sequence[int]], limits: Mapping[int, int]) -> dict[int, list[int]]:
        drafts: dict[int, list[int]] = {}
        for seq_id, history in histories.items():
            draft = self.lookup(history, limits.get(seq_id, 0))
            if draft:
                drafts[seq_id] = draft
        return drafts

    def lookup(self, history: Sequence[int], limit: int) -> list[int]:
        """The draft for one history, at most `limit` tokens."""
        if limit <= 0 or len(history) <= self.min_ngram:
            return []
        tokens = np.asarray(history, dtype=np.int64)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            start = _last_earlier_occurrence(tokens, n)
            if start is not None:
                follow = start + n
                return [int(t) for t in tokens[follow : follow + limit]]
        return []

    def close(self) -> None:
        pass


def _last_earlier_occurrence(tokens: np.ndarray[tuple[int], np.dtype[np.int64]], n: int) -> int | None:
    """Where the last `n` tokens also occur with at least one token after them, the latest such start."""
    key = tokens[-n:]
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # windows that a token follows
    hits = np.flatnonzero((windows == key).all(axis=1))
    return int(hits[-1]) if len(hits) else None


# -- a draft model ----------------------------------------------------------------------

#: Greedy choice, nothing else: the draft guesses the target's most likely tokens.
_GREEDY = Options(temperature=0.0, repeat_penalty=1.0, top_k=1)

#: Token ids spread over the vocabulary whose texts must match, besides the special tokens.
_SAMPLED_IDS = 512


def check_same_vocabulary(target: Model, draft: Model, draft_name: str) -> None:
    """Raise `DraftModelMismatch` unless the draft's token ids mean what the target's do."""
    problem = None
    if draft.n_vocab != target.n_vocab:
        problem = f"it has {draft.n_vocab} tokens where the model has {target.n_vocab}"
    elif (draft.bos_token, draft.eos_token) != (target.bos_token, target.eos_token):
        problem = (
            f"its BOS/EOS tokens are {draft.bos_token}/{draft.eos_token} "
            f"where the model's are {target.bos_token}/{target.eos_token}"
        )
    else:
        step = max(1, target.n_vocab // _SAMPLED_IDS)
        ids = sorted({*range(0, target.n_vocab, step), *range(max(0, target.n_vocab - 16), target.n_vocab)})
        for token in ids:
            if draft.token_text(token) != target.token_text(token):
                problem = (
                    f"token {token} is {draft.token_text(token)!r} in it but {target.token_text(token)!r} in the model"
                )
                break
    if problem is not None:
        raise DraftModelMismatch(
            f"the draft model {draft_name} cannot draft for this model: {problem}; "
            "a draft model must share the model's vocabulary (a smaller model of the same family)"
        )


class ModelDrafter:
    """A small model drafting greedily for every slot of the target, in batched decodes.

    Its context has one sequence per target slot. Before drafting, each sequence is brought in line
    with the slot's tokens: the prefix it already holds stays, the rest is dropped and what is missing
    is evaluated (every sequence's part in the same batches). Then each drafted position costs one
    decode for all the sequences still drafting.
    """

    def __init__(
        self,
        backend: Backend,
        target: Model,
        config: LoadConfig,
        *,
        gpu_layers: int = 0,
        tensor_split: Sequence[float] | None = None,
    ) -> None:
        if not config.draft_model_path:
            raise ValueError("the configuration names no draft model")
        self.config = attrs.evolve(
            config, model_path=config.draft_model_path, adapters=(), draft_model_path=None, prompt_lookup=False
        )
        with contextlib.ExitStack() as undo:  # a failed load frees what was made so far
            self.model = backend.load_model(self.config, gpu_layers=gpu_layers, tensor_split=tensor_split)
            undo.callback(self.model.close)
            check_same_vocabulary(target, self.model, config.draft_model_path)
            self.context = backend.new_context(self.model, self.config)
            undo.callback(self.context.close)
            self.batch = backend.new_batch(max(self.context.n_batch, config.num_parallel), config.num_parallel)
            undo.callback(self.batch.close)
            self.sampler = backend.new_sampler(self.model, _GREEDY, grammar=None, n_ctx=self.context.n_ctx_seq)
            undo.pop_all()
        self.held: dict[int, list[int]] = {}  # per sequence: the tokens whose KV entries it holds
        self._closed = False

    def propose(self, histories: Mapping[int, Sequence[int]], limits: Mapping[int, int]) -> dict[int, list[int]]:
        # Drafted tokens are evaluated up to the limit's second last: keep them inside the context.
        limits = {
            seq: min(limits.get(seq, 0), self.context.n_ctx_seq - len(history)) for seq, history in histories.items()
        }
        wanted = {seq: history for seq, history in histories.items() if limits[seq] > 0 and history}
        if not wanted:
            return {}
        drafts = self._catch_up(wanted)
        drafting = [seq for seq, draft in drafts.items() if self._more(draft, limits[seq])]
        while drafting:
            self.batch.clear()
            indices: dict[int, int] = {}
            for seq in drafting:
                held, token = self.held[seq], drafts[seq][-1]
                indices[seq] = self.batch.add(token, len(held), seq, True)
                held.append(token)
            if not self._decode():
                break  # what was drafted so far still stands
            for seq in drafting:
                drafts[seq].append(self.sampler.sample(self.context, indices[seq]))
            drafting = [seq for seq in drafting if self._more(drafts[seq], limits[seq])]
        return drafts

    def _more(self, draft: list[int], limit: int) -> bool:
        """Whether to draft past this draft: not past the limit, nor past the end of the text."""
        return len(draft) < limit and not self.model.is_eog(draft[-1])

    def _catch_up(self, histories: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        """Bring the sequences' held tokens one batch closer to their histories, and draft the first token
        of each sequence that now holds its whole history (from the logits of its history's end).

        One batch a call: a long prompt is caught up over several of the worker's steps, so no step waits
        on the draft model for long and a cancelled request is let go at the next step."""
        capacity = self.batch.capacity
        missing: list[tuple[int, int, int, bool]] = []  # (seq, token, pos, last of its history)
        for seq, history in histories.items():
            held = self._keep_prefix(seq, history)
            end = min(len(history), len(held) + capacity - len(missing))
            missing.extend((seq, history[pos], pos, pos == len(history) - 1) for pos in range(len(held), end))
            if len(missing) == capacity:
                break
        self.batch.clear()
        last: dict[int, int] = {}
        for seq, token, pos, is_last in missing:
            index = self.batch.add(token, pos, seq, is_last)
            if is_last:
                last[seq] = index
        if not self._decode():
            return {}
        for seq, token, _pos, _is_last in missing:
            self.held[seq].append(token)
        return {seq: [self.sampler.sample(self.context, index)] for seq, index in last.items()}

    def _keep_prefix(self, seq: int, history: Sequence[int]) -> list[int]:
        """Drop what the sequence holds past its common prefix with `history` (less the history's last token,
        whose logits are needed); returns the tokens it still holds."""
        held = self.held.setdefault(seq, [])
        keep = min(_common_prefix(held, list(history)), len(history) - 1)
        if keep < len(held):
            if keep > 0 and (self.context.seq_pos_min(seq) > 0 or not self.context.seq_rm(seq, keep)):
                keep = 0  # a sliding-window cache may have dropped early positions: start over
            if keep == 0:
                self.context.seq_rm(seq, 0)
            del held[keep:]
        return held

    def _decode(self) -> bool:
        """Decode the batch; on failure, forget what every sequence holds (the next draft starts over)."""
        status = self.context.decode(self.batch)
        if status == 0:
            return True
        logger.warning("the draft model's decode returned %d; drafting starts over", status)
        for seq in list(self.held):
            self.context.seq_rm(seq, 0)
        self.held.clear()
        return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.sampler.close()
            self.batch.close()
            self.context.close()
            self.model.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share: compared in slices (C speed), halving the mismatching span."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n  # the usual case: one holds the other, the history grown by a few tokens
    same, differ = 0, n
    while differ - same > 1:
        middle = (same + differ) // 2
        if a[:middle] == b[:middle]:
            same = middle
        else:
            differ = middle
    return same
