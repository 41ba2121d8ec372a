"""Prompt batches for the sampler: rows -> template -> tokens -> a grain pipeline.

Rows are read, field-mapped, templated and tokenized once, when the pipeline is built, so the
counters in ``pipeline.stats`` are complete before the first batch and do not depend on how
far iteration got. The grain graph over the usable rows is

    source (+ padding rows) -> shuffle(seed, reshuffled each epoch) -> this host's stride
    -> repeat(num_epochs) -> batch(batch_size, fixed shape)

Each host takes every ``shard_count``-th element of the same global permutation, starting at
``shard_index``, so hosts see disjoint rows and every host yields the same number of batches
(needed for multi-host lockstep): with ``drop_remainder`` the permutation is cut to a multiple
of ``shard_count``; otherwise padding rows (``row_valid`` False) fill it up, and the last
partial batch is padded too.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

import grain
import numpy as np

from sspo_jax.data.sources import FieldMap, load_rows
from sspo_jax.data.templates import render_prompt

OVERLONG_MODES = ("drop", "truncate")


class PromptIterator(grain.DatasetIterator):
    """A grain iterator over prompt batches whose state carries the pipeline's fingerprint.

    ``get_state()`` is a small JSON-able dict (what orbax's grain handler writes);
    ``set_state()`` refuses a state saved by a pipeline with different data or settings,
    instead of silently resuming at the wrong place.
    """

    def __init__(self, inner: grain.DatasetIterator, fingerprint: str):
        super().__init__(inner)
        self._fingerprint = fingerprint

    def __next__(self) -> dict[str, Any]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._fingerprint, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("pipeline") != self._fingerprint:
            raise ValueError(
                "this data-iterator state was saved by a pipeline with other rows or settings "
                f"(fingerprint {state.get('pipeline')!r}, this pipeline {self._fingerprint!r}); "
                "resume with the same data files, template, tokenizer, seed, batch size and shards"
            )
        self._parent.set_state(state["grain"])


class PromptPipeline:
    """Fixed-shape, left-padded prompt batches from a problem source, for one host.

    Each batch is a dict: ``prompt_ids`` int32 [B, max_prompt_len] and ``prompt_mask`` int32
    [B, max_prompt_len] (left padded), ``row_valid`` bool [B] (False on padding rows),
    ``row_index`` int64 [B] (index into ``self.rows``, -1 on padding), and per row the
    ``answer`` and ``problem`` strings (lists of length B, "" on padding).

    ``source``: a .jsonl/.json/.parquet path, ``"hf:<name>"`` (needs `datasets`), or an
    iterable of dicts. ``num_epochs=None`` repeats forever. ``overlong`` is ``drop`` (count
    and skip prompts longer than ``max_prompt_len`` tokens) or ``truncate`` (keep the last
    ``max_prompt_len`` tokens). ``shard_index``/``shard_count`` default to
    ``jax.process_index()``/``jax.process_count()``.
    """

    def __init__(
        self, source: str | os.PathLike | Iterable[dict], tokenizer, *, batch_size: int,
        max_prompt_len: int, template: str = "qwen25-math-cot", fields: FieldMap = FieldMap(),
        seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
        drop_remainder: bool = True, overlong: str = "drop", strict: bool = False,
        shard_index: int | None = None, shard_count: int | None = None,
        hub_split: str = "train", hub_config: str | None = None, pad_id: int | None = None,
    ):
        if batch_size < 1 or max_prompt_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_prompt_len ({max_prompt_len}) must be >= 1")
        if overlong not in OVERLONG_MODES:
            raise ValueError(f"overlong={overlong!r} is not one of {OVERLONG_MODES}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
        shard_index, shard_count = _resolve_shard(shard_index, shard_count)
        self.pad_id = _resolve_pad_id(tokenizer, pad_id)
        self.batch_size, self.max_prompt_len = batch_size, max_prompt_len

        rows, counts = load_rows(source, fields, strict=strict, hub_split=hub_split, hub_config=hub_config)
        self.rows, self._prompt_ids = [], []
        counts.update(dropped_too_long=0, truncated=0)
        texts = [render_prompt(row["problem"], template, tokenizer) for row in rows]
        all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batched call
        for row, ids in zip(rows, all_ids):
            if len(ids) > max_prompt_len:
                if overlong == "drop":
                    counts["dropped_too_long"] += 1
                    continue
                ids = ids[-max_prompt_len:]  # keep the end: the assistant header must stay
                counts["truncated"] += 1
            self.rows.append(row)
            self._prompt_ids.append(np.asarray(ids, np.int32))
        counts["rows_used"] = len(self.rows)
        self.stats: dict[str, int] = counts
        if not self.rows:
            raise ValueError(
                f"no usable row: all {len(rows)} prompts are longer than max_prompt_len="
                f"{max_prompt_len} tokens; raise max_prompt_len or pass overlong='truncate'"
            )

        n, k = len(self.rows), shard_count
        if drop_remainder and n < k:
            raise ValueError(f"{n} usable rows cannot feed {k} hosts; use more data or drop_remainder=False")
        elements = list(range(n))
        if not drop_remainder:
            elements += [-1] * (-n % k)  # padding rows so every host gets ceil(n / k)
        epoch_len = len(elements) - (len(elements) % k if drop_remainder else 0)
        dataset = grain.MapDataset.source(elements)
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset[shard_index:epoch_len:k].repeat(num_epochs)
        self.rows_per_epoch = epoch_len // k
        self.dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, batch_fn=self._collate)
        if num_epochs is not None and len(self.dataset) == 0:
            raise ValueError(
                f"{self.rows_per_epoch * num_epochs} rows per host cannot fill one batch of "
                f"{batch_size} with drop_remainder=True; lower batch_size or set drop_remainder=False"
            )
        settings = dict(
            template=template, fields=repr(fields), seed=seed, shuffle=shuffle,
            num_epochs=num_epochs, drop_remainder=drop_remainder, batch_size=batch_size,
            max_prompt_len=max_prompt_len, shard=(shard_index, shard_count), pad_id=self.pad_id,
        )
        self.fingerprint = _fingerprint(settings, self.rows, self._prompt_ids)

    def __len__(self) -> int:
        """Number of batches this host yields (a huge number when repeating forever)."""
        return len(self.dataset)

    def iterator(self) -> PromptIterator:
        """A fresh iterator from the start; restore a position with ``set_state``."""
        inner = self.dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return PromptIterator(iter(inner), self.fingerprint)

    def __iter__(self) -> PromptIterator:
        return self.iterator()

    def _collate(self, indices) -> dict[str, Any]:
        """Left-pad the prompts of ``indices`` (-1 = padding row) into a full batch."""
        indices = list(indices) + [-1] * (self.batch_size - len(indices))
        ids = np.full((self.batch_size, self.max_prompt_len), self.pad_id, np.int32)
        mask = np.zeros((self.batch_size, self.max_prompt_len), np.int32)
        for b, i in enumerate(indices):
            if i >= 0:
                prompt = self._prompt_ids[i]
                ids[b, self.max_prompt_len - len(prompt):] = prompt
                mask[b, self.max_prompt_len - len(prompt):] = 1
        return {
            "prompt_ids": ids,
            "prompt_mask": mask,
            "row_valid": np.asarray([i >= 0 for i in indices]),
            "row_index": np.asarray(indices, np.int64),
            "answer": [self.rows[i]["answer"] if i >= 0 else "" for i in indices],
            "problem": [self.rows[i]["problem"] if i >= 0 else "" for i in indices],
        }


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # only here: the data package is usable without touching JAX otherwise

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


def _resolve_pad_id(tokenizer, pad_id: int | None) -> int:
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; pass pad_id= or set tokenizer.pad_token")
    return int(pad_id)


def _fingerprint(settings: dict, rows: list[dict], prompt_ids: list[np.ndarray]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for row, ids in zip(rows, prompt_ids):
        digest.update(row["answer"].encode())
        digest.update(ids.tobytes())
    return digest.hexdigest()[:16]
