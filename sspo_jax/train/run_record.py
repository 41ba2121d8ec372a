"""The workdir's run record, so a rerun resumes the same run or says why it will not.

- `config.json` (written by `setup.write_run_info`) is the config the run was started with.
  Rerunning in a workdir that holds checkpoints resumes it only with the same config:
  `config_changes` names every field that differs. Changes in SAFE_CHANGES (more steps, the
  evaluation, checkpoint and compilation-cache settings) are allowed when asked for
  (`--allow_config_change`); anything else (the loss, the learning rate, the model, the data,
  ...) would silently mix two experiments into one run and is refused.
- `.lock` holds the pid and host of the process training there, so two runs never interleave
  their metrics in one workdir; a lock left by a process that is gone is taken over.
"""
from __future__ import annotations

import json
import os
import socket

# Fields (or block prefixes) a resumed run may change: they do not change what the policy
# learned so far or how it learns.
SAFE_CHANGES = ("steps", "eval.", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",
                "compile_cache.", "debug.")
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# The fingerprint of the vocabulary a run trained with: the demo's tokenizer is rebuilt at every
# start (its ids depend on the code that builds it), and a checkpoint read with other token ids
# would decode garbage without any error.
TOKENIZER_FILE = "tokenizer.sha256"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _with_resolved_loss(record: dict) -> dict:
    """The record with its `loss` block replaced by the LossConfig it resolves to, so that two
    spellings of one objective (a preset's clip range set as eps_low/eps_high, or taken from
    loss.clip_by_preset) compare equal."""
    import dataclasses

    import ml_collections

    from sspo_jax.run_config import loss_config
    try:
        resolved = loss_config(ml_collections.ConfigDict(record.get("loss", {})))
    except (ValueError, KeyError, TypeError):
        return record  # a record this code cannot resolve: compared field by field
    loss = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(resolved).items()}
    return {**record, "loss": {"name": record["loss"].get("name"), **loss}}


def config_changes(workdir: str, config) -> dict[str, tuple]:
    """{field: (recorded value, new value)} between the workdir's config.json and `config`
    (empty when there is no record); the loss block is compared as the objective it resolves to."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = _flat(_with_resolved_loss(json.load(f)))
    new = _flat(_with_resolved_loss(json.loads(config.to_json_best_effort())))
    # A field the record lacks was added to the code after the run started; at its default it
    # keeps the behaviour the run had (new fields are added that way), so it is no change.
    from sspo_jax.run_config import base_config
    defaults = _flat(json.loads(base_config().to_json_best_effort()))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not (k not in old and k in defaults and new.get(k) == defaults[k])}


def check_resume(workdir: str, config, allow_changes: bool) -> dict[str, tuple]:
    """Raises ValueError when `config` may not resume the run in `workdir`; returns the allowed
    changes."""
    changes = config_changes(workdir, config)
    if not changes:
        return {}
    held_out = config.data.source != "synthetic" and not config.eval.benchmarks
    unsafe = [k for k in changes if not k.startswith(SAFE_CHANGES)
              or (held_out and k in ("eval.num_prompts", "eval.benchmarks"))]
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if unsafe:
        raise ValueError(
            f"{workdir} holds a run with another config ({listed}). Resuming would mix two "
            f"experiments: use another --workdir (fields that cannot change on resume: {unsafe})")
    if not allow_changes:
        raise ValueError(
            f"{workdir} holds a run with another config ({listed}); rerun with "
            f"--allow_config_change to resume it with these changes, or use another --workdir")
    return changes


# The fields that say which model a run trained: reading its checkpoints with others builds the
# wrong skeleton (a shape error at best, another tokenizer's text at worst).
MODEL_IDENTITY = ("model.hf_dir", "model.tokenizer_dir", "model.tiny.")


def check_reader(workdir: str, config, command: str) -> None:
    """Raises ValueError when `config` names another model than the run recorded in `workdir`
    (evaluate and export read its checkpoints; other fields, such as eval.*, may differ). Process
    0 holds the record and decides; every process stops with it."""
    from sspo_jax.parallel import hosts
    hosts.on_chief(lambda: _check_reader(workdir, config, command),
                   f"process 0 refused to {command} this workdir with this config: see its log")


def _check_reader(workdir: str, config, command: str) -> None:
    changes = {k: v for k, v in config_changes(workdir, config).items()
               if k.startswith(MODEL_IDENTITY)}
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ValueError(
            f"{workdir} holds a run of another model than this config's ({listed}): {command} "
            f"would read its checkpoints into the wrong model. Pass the run's config (recorded "
            f"in {os.path.join(workdir, CONFIG_FILE)}) or another --workdir")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (every token and its id, added tokens included)."""
    import hashlib
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_tokenizer(workdir: str, tokenizer, *, record: bool) -> None:
    """Raises ValueError (on every process) when the run in `workdir` was trained with another
    vocabulary than `tokenizer`'s; with `record` (the trainer), writes the fingerprint when the
    workdir has none yet. Process 0 decides."""
    from sspo_jax.parallel import hosts
    hosts.on_chief(lambda: _check_tokenizer(workdir, tokenizer, record),
                   "process 0 found another tokenizer than the run's: see its log")


def _check_tokenizer(workdir: str, tokenizer, record: bool) -> None:
    path = os.path.join(workdir, TOKENIZER_FILE)
    now = f"{len(tokenizer)} {tokenizer_fingerprint(tokenizer)}"
    before = _read(path)
    if before is not None and before.strip() != now:
        raise ValueError(
            f"{workdir} holds a run trained with another tokenizer (vocabulary "
            f"{before.split()[0]} tokens, fingerprint {before.split()[-1][:12]}); this one has "
            f"{len(tokenizer)} tokens, fingerprint {now.split()[-1][:12]}. Its checkpoints "
            f"would read other token ids: use the tokenizer it was trained with (the software "
            f"version in run_info.json) or another --workdir")
    if before is None and record:
        with open(path, "w") as f:
            f.write(now + "\n")


class WorkdirLock:
    """Held by the process that trains in `workdir` (process 0 of a multi-process run)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.mine = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None and _age(self.path) < 10:
                    holder = "a process that is writing it"  # created an instant ago
                elif holder == self.mine:
                    holder = None  # our own pid: a restarted container's old lock
                if holder is not None and _alive(holder):
                    raise RuntimeError(
                        f"another run ({holder}: host:pid) is training in "
                        f"{os.path.dirname(self.path)}; wait for it or use another --workdir (if "
                        f"no run is there, delete {self.path})") from None
                _remove(self.path)  # left by a process that is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.mine)
            return

    def release(self) -> None:
        if _read(self.path) == self.mine:
            _remove(self.path)

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *_) -> None:
        self.release()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _age(path: str) -> float:
    import time
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return float("inf")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _alive(holder: str) -> bool:
    """Whether the lock's process still runs (a lock from another host counts as alive: it
    cannot be checked from here)."""
    if ":" not in holder:
        return True  # "a process that is writing it"
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True
