"""Multi-host objective=dpo: two processes of two CPU devices each (`jax.distributed`, gloo)
precompute the reference's log-probs together (each process feeds its rows, every process
gets the whole table) and train fsdp as one 4-device mesh; they end where one process with
four devices ends, and both print the same held-out metrics."""

import json
import os

import numpy as np
import pytest

from tests.train.test_dpo import _pairs
from tests.train.test_multihost_train import ADAM_EPS, ROOT, TOLERANCE, XLA_FAST, _Jobs, _params, _summary, _wait

STEPS = 3


class _DPOJobs(_Jobs):
    """`python -m train` jobs of the tiny GPT with objective=dpo (test_multihost_train's launcher)."""

    def start(self, workdir, local_devices, *args, process=None):
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices} {XLA_FAST}",
                   JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "train", "--config=configs/gpt.py:tiny", f"--workdir={workdir}", *args]
        if process is not None:
            port, pid, count = process
            cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}", f"--process_id={pid}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.data.test_preference import _hf_dir

    root = tmp_path_factory.mktemp("dpo_multihost")
    (root / "tok").mkdir()
    _hf_dir(root / "tok")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(line) + "\n" for line in _pairs()))
    flags = [f"--config.{o}" for o in (
        "objective=dpo", f"tokenizer.path={root / 'tok'}", f"data.source=files:{pairs}", "data.seq_len=32",
        "model.max_len=32", "data.batch_size=8", f"steps={STEPS}", "schedule.name=constant",
        "schedule.warmup_steps=0", "optimizer.lr=1e-2", "data.validation_fraction=0.25", "eval.max_batches=0",
        "sharding.strategy=fsdp", "logging.progress_bar=false", "logging.peak_flops=1e11",
        "logging.log_every_steps=1")] + [ADAM_EPS]
    jobs = _DPOJobs()
    try:
        two = jobs.two_processes(root / "two", *flags)
        one = jobs.start(root / "one", 4, *flags)
        outputs = _wait(two)
        _wait([one])
    finally:
        jobs.kill_all()
    return root, outputs


def test_two_processes_precompute_and_train_like_one(runs):
    root, outputs = runs
    got, want = _params(root / "two", STEPS), _params(root / "one", STEPS)
    for a, b in zip(jax_leaves(got), jax_leaves(want)):
        # Relative to the leaf, or to 1 for a leaf that holds only rounding: the attention's key
        # bias has no gradient in exact arithmetic (softmax ignores a shift of all its scores).
        relative = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)
        assert relative < TOLERANCE, relative
    s2, s1 = _summary(root / "two"), _summary(root / "one")
    for key in ("loss", "rewards_margins", "rewards_accuracies"):
        np.testing.assert_allclose(s2["eval_after"][key], s1["eval_after"][key], rtol=TOLERANCE, atol=1e-6)
    # Before the first step the policy is the reference on every process's rows: the loss is log 2.
    assert s2["eval_before"]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    # Both processes evaluated every held-out pair with the whole table (the lead prints it).
    assert "before training: " in outputs[0][0] and "new run in" in outputs[0][0]


def jax_leaves(tree):
    import jax

    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
