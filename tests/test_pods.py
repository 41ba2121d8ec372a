"""A pod, on CPU: an HF checkpoint trained on a mesh whose fsdp axis spans two JAX processes.

Two processes x 4 CPU devices (gloo), a random Qwen2 checkpoint written by `transformers` with
its tokenizer, mesh data=1 x fsdp=4 x tensor=2, so every weight is split across both processes
(no process can read a whole parameter). `sspo_jax.train` is killed with SIGKILL after a
checkpoint and resumed by the same command, then `sspo_jax.evaluate` and `sspo_jax.export` run
on the same two processes; the export loads in plain `transformers` with the logits of the
checkpoint, and the run equals the same command in one process of 8 devices.

Also here: evaluation and export restore the parameters only (measured from the arrays alive
after the restore), and the compilation cache serves a repeated command.
"""
import json
import os
import re
import signal
import time

import jax
import multiproc as mp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tiny_hf import make_qwen2

from sspo_jax import parallel, run_config, specs
from sspo_jax.data.tokenizer import build_tokenizer
from sspo_jax.generate import sampler

# A short demo run of the HF model on the pod mesh. A warm start of 3 steps exercises the
# supervised step on the process-spanning weights too. The compilation cache keeps even these
# small programs (min_compile_secs=0), so the resumed run can be seen reading them.
POD_RUN = {
    "steps": 3, "warm_start.steps": 3, "warm_start.examples": 64, "warm_start.batch_size": 8,
    "rollout.prompts_per_step": 8, "rollout.num_samples": 4, "rollout.max_new_tokens": 20,
    "train.ppo_mini_batches": 2, "train.micro_batch_size": 8, "eval.every": 2,
    "eval.num_prompts": 16, "eval.batch_size": 8, "eval.max_new_tokens": 20,
    "checkpoint.every": 1, "data.synthetic_train_size": 200, "compile_cache.min_compile_secs": 0,
    "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2,
    # Adam divides each gradient entry by its own magnitude (+ eps): on a step with no signal
    # (every reward 0, the policy near the KL reference) the gradient is float noise of ~1e-10
    # per entry (reference and policy log-probs from two programs), which eps = 1e-8 turns into
    # parameter moves of ~lr, different in the two layouts, and the runs apart. eps = 1e-4 keeps
    # such noise below 1e-6 lr; this run's real gradients (~1e-3 per entry) are not affected.
    "optimizer.eps": 1e-4,
}
# float32 with a KL term, so a resumed run also restores its reference policy (step 0's
# parameters alone); bf16 compute with the sampler's bf16 copy; the packed update.
VARIANTS = {"float32_kl": {"loss.kl_beta": 0.05},
            "bfloat16_sampler_copy": {"model.dtype": "bfloat16", "mesh.sampler_reshard": True},
            # The Qwen configs' rollout and update across processes: the continuous engine (4
            # slots per batch shard for its 8 rows, so rows queue), packed rows planned from
            # all-gathered lengths, placed per process; the recomputed old and reference
            # log-probs unpacked.
            "float32_packed_kl": {"loss.kl_beta": 0.05, "train.packing": True,
                                  "rollout.old_logprobs": "recompute",
                                  "rollout.engine": "continuous", "rollout.slots": 4}}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers Qwen2 checkpoint over the project's tokenizer (the synthetic task
    needs its digits and operators), saved with that tokenizer, as a user's checkpoint."""
    out = tmp_path_factory.mktemp("hf")
    tokenizer = build_tokenizer()
    make_qwen2(out, vocab_size=len(tokenizer), seed=4)
    tokenizer.save_pretrained(out)
    return str(out)


def _args(workdir, overrides):
    return ["--config=configs/demo.py", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _kill_after_checkpoint(procs, checkpoints, step, timeout=900):
    """SIGKILL every process once the checkpoint of `step` is complete on disk."""
    deadline = time.time() + timeout
    while not os.path.isdir(os.path.join(checkpoints, str(step))):
        assert all(p.poll() is None for p in procs), "a process ended before the checkpoint"
        assert time.time() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()


def _cache_counts(log: str) -> tuple[int, int]:
    """(programs read, programs compiled) from a command's `compilation cache` line."""
    line = next(l for l in log.splitlines() if l.startswith("compilation cache"))
    match = re.search(r": (\d+) programs read, (\d+) compiled", line)
    assert match, line
    return int(match[1]), int(match[2])


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_checkpoint_on_an_fsdp_mesh_across_two_processes(hf_dir, tmp_path, variant):
    overrides = {**POD_RUN, **VARIANTS[variant], "model.hf_dir": hf_dir}
    pod, one = tmp_path / "pod", tmp_path / "one"
    log = lambda name: [tmp_path / f"{name}_{i}.log" for i in range(2)]  # noqa: E731
    # One process of 8 devices runs the same command alongside (the reference).
    single = mp.start("sspo_jax.train", _args(one, overrides), 8, tmp_path / "one.log")
    procs = mp.start_processes("sspo_jax.train", _args(pod, overrides), 2, 4, log("train"))
    _kill_after_checkpoint(procs, str(pod / "checkpoints"), 1)
    # The same command again: it resumes from the newest complete checkpoint.
    procs = mp.start_processes("sspo_jax.train", _args(pod, overrides), 2, 4, log("resume"))
    mp.finish(procs, log("resume"))
    resume_log = open(log("resume")[0]).read()
    assert "resumed from the checkpoint of step" in resume_log
    # The resumed run read programs the killed one compiled (JAX writes from process 0).
    assert _cache_counts(resume_log)[0] > 0

    info = json.load(open(pod / "run_info.json"))
    assert info["process_count"] == 2 and info["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    rows_pod = mp.metric_rows(pod)
    assert [r["step"] for r in rows_pod] == [0, 1, 2, 3]
    mp.finish([single], [tmp_path / "one.log"])
    rows_one = mp.metric_rows(one)
    assert [r["step"] for r in rows_one] == [0, 1, 2, 3]
    # Steps 0 and 1 ran before the kill, 2 and 3 after the resume.
    if variant == "float32_kl":
        # A step whose groups all have equal rewards has no signal: its gradient statistics are
        # float noise (grad_norm ~1e-6 either way), compared like bf16's; the rest tightly.
        noise = {r["step"] for r in rows_one if r.get("groups/zero_variance_frac") == 1.0}
        mp.assert_same_metrics(rows_one, rows_pod, steps={0, 1, 2, 3} - noise, rel=1e-4, abs_=2e-6)
        mp.assert_same_metrics(rows_one, rows_pod, steps=noise, rel=1e-2, abs_=1e-4)
    else:
        # bfloat16 compute: sums reordered by the collectives round at bf16's 8 bits, so float
        # statistics agree to 1e-2 relative. Steps 0 and 1 agree in every discrete outcome too;
        # later, a greedy near-tie of this random model can flip one evaluation answer (seen:
        # 11 vs 12 wrong of 16 at step 2), so only the first two steps are compared.
        mp.assert_same_metrics(rows_one, rows_pod, steps={0, 1}, rel=1e-2, abs_=1e-4)

    # Evaluation and export on the same two processes.
    procs = mp.start_processes("sspo_jax.evaluate", _args(pod, overrides), 2, 4, log("eval"))
    mp.finish(procs, log("eval"))
    summary = json.load(open(pod / "eval" / "summary.json"))
    assert summary["policy"].startswith("checkpoint step 3")
    assert summary["benchmarks"]["synthetic"]["problems"] == POD_RUN["eval.num_prompts"]
    out = tmp_path / "export"
    procs = mp.start_processes("sspo_jax.export", [*_args(pod, overrides), f"--out={out}"],
                               2, 4, log("export"))
    mp.finish(procs, log("export"))
    assert "exported the policy of step 3" in open(log("export")[0]).read()

    # Plain transformers loads the export and gives the checkpoint's logits; its generate stops
    # where the sampler stops (generation_config.json), and the files are readable by all.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    project_tokenizer = build_tokenizer()
    eos = sorted(sampler.default_eos_ids(project_tokenizer), key=lambda e: e != project_tokenizer.eos_token_id)
    assert hf.generation_config.eos_token_id == eos and hf.config.eos_token_id == eos[0]
    assert hf.generation_config.pad_token_id == project_tokenizer.pad_token_id
    assert all(os.stat(out / f).st_mode & 0o777 == 0o644 for f in os.listdir(out))
    # Our model from the same checkpoint, computing in float32 to compare the weights themselves.
    step, ours = mp.restored_policy(mp.config_with({**overrides, "model.dtype": "float32"}), pod)
    assert step == 3
    ids = [tokenizer("12 + 30 =", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jax.numpy.asarray(ids))), expected, atol=1e-4, rtol=1e-4)


def _per_device_bytes(arrays) -> dict:
    out: dict = {}
    for a in arrays:
        for shard in a.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def test_evaluation_and_export_restore_the_parameters_only(hf_dir, tmp_path, monkeypatch):
    """A checkpoint holding parameters and Adam moments (3x the parameters) on a 1 x 4 x 2 mesh:
    what `sspo_jax.export` has alive right after its restore is the parameters, shard for shard,
    and the restore neither loads the HF weights nor builds an optimizer state."""
    from sspo_jax import export
    from sspo_jax.train import setup, update
    from sspo_jax.train.checkpoint import Checkpointer
    c = run_config.get_config()
    c.model.hf_dir = hf_dir
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    mesh = parallel.mesh_from_config(c.mesh)
    spec = specs.parse(c)
    _, model = setup.build_policy(spec.model, spec.seed, mesh)
    _, params = nnx.split(model)
    params = jax.tree.map(lambda x: x * 1.5, params)
    opt_state = update.init_optimizer(setup.run_optimizer(spec.optimizer, spec.optimizer_steps), params)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", save_every=1)
    ckpt.save(5, {"params": params, "opt_state": opt_state}, {"data": {}}, force=True)
    ckpt.close()
    want = _per_device_bytes(jax.tree.leaves(params))
    del model, params, opt_state

    seen = {}
    real_restore = setup.restore_params

    def measured_restore(model, *args, **kwargs):
        before = {id(a) for a in jax.live_arrays()}
        step = real_restore(model, *args, **kwargs)
        seen["new"] = [a for a in jax.live_arrays() if id(a) not in before]
        seen["params"] = jax.tree.leaves(nnx.state(model))
        return step

    real_read = Checkpointer.restore

    def recorded_read(self, abstract_items, step=None):
        seen.setdefault("items", []).append(sorted(abstract_items))
        return real_read(self, abstract_items, step)

    monkeypatch.setattr(setup, "restore_params", measured_restore)
    monkeypatch.setattr(Checkpointer, "restore", recorded_read)
    fail = lambda what: lambda *a, **k: pytest.fail(what)  # noqa: E731
    monkeypatch.setattr(setup, "build_policy", fail("loaded the HF weights"))
    for name in ("init_optimizer", "optimizer_state_shardings"):
        monkeypatch.setattr(update, name, fail("built an optimizer state"))
    monkeypatch.setattr(setup, "abstract_opt_state", fail("built an optimizer state"))
    assert export.export(c, str(tmp_path / "run"), str(tmp_path / "hf_out")) == 5
    assert seen["items"] == [["params"]]  # the optimizer state was not even read
    assert sum(a.size for a in seen["new"]) == sum(a.size for a in seen["params"])
    assert {id(a) for a in seen["new"]} == {id(a) for a in seen["params"]}
    assert _per_device_bytes(seen["new"]) == want
    assert all(isinstance(a.sharding, jax.sharding.NamedSharding) for a in seen["new"])


def test_a_repeated_command_reads_the_compilation_cache(hf_dir, tmp_path):
    """`sspo_jax.evaluate` twice with the same flags: the second compiles nothing."""
    args = _args(tmp_path / "w", {"model.hf_dir": hf_dir, "eval.num_prompts": 8, "eval.batch_size": 8,
                                          "eval.max_new_tokens": 8,
                                          "compile_cache.min_compile_secs": 0})
    logs = []
    for i in range(2):
        proc = mp.start("sspo_jax.evaluate", args, 1, tmp_path / f"eval{i}.log")
        mp.finish([proc], [tmp_path / f"eval{i}.log"], timeout=600)
        logs.append(open(tmp_path / f"eval{i}.log").read())
    assert f"compilation cache {tmp_path / 'w' / 'compile_cache'}:" in logs[0]
    (read0, compiled0), (read1, compiled1) = _cache_counts(logs[0]), _cache_counts(logs[1])
    assert compiled0 > 0 and read1 == read0 + compiled0 and compiled1 == 0, (logs[0][-300:], logs[1][-300:])
    assert len(os.listdir(tmp_path / "w" / "compile_cache")) >= compiled0
