"""The pretraining loop end to end: learning, resume after SIGKILL, sharded resume, SIGTERM, guards, outputs."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.loader import load_config
from train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A data_dir and a trained tokenizer shared by the runs of this module (saves rebuilding)."""
    root = tmp_path_factory.mktemp("shared")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [f"data.data_dir={root / 'tfds'}"])
    from train import build

    data_cfg = build.data_config(config, str(root))
    build.tokenizer(config, str(root), data_cfg)  # trains and saves root/tokenizer
    return [f"data.data_dir={root / 'tfds'}", f"tokenizer.path={root / 'tokenizer'}"]


def _config(shared, *overrides):
    return load_config(os.path.join(REPO, "configs/gpt.py:tiny"),
                       [*shared, "logging.progress_bar=false", "logging.peak_flops=1e11", *overrides])


def _final_params(workdir, step):
    tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return tree["params"]


def _assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_tiny_run_learns_and_writes_its_outputs(shared, tmp_path):
    summary = trainer.run(_config(shared, "steps=40", "eval.every_steps=15"), str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [x["loss"] for x in lines if "loss" in x]
    assert train_losses[-1] < train_losses[0] - 0.5, train_losses
    # Mid-run evaluation (eval.every_steps > 0) writes its own lines, and the model improves between them.
    val_lines = [x for x in lines if "val_loss" in x]
    assert [x["step"] for x in val_lines] == [15, 30], val_lines
    assert all(np.isfinite(x["val_loss"]) and 0 <= x["val_accuracy"] <= 1 for x in val_lines)
    assert val_lines[1]["val_loss"] < val_lines[0]["val_loss"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_step", "val_loss", "val_bits_per_byte", "xz_bits_per_byte", "tokens_per_second", "mfu"):
        assert key in on_disk and on_disk[key] is not None, key
    assert on_disk["final_step"] == 40 == summary["final_step"]
    # bits per byte is the validation NLL re-expressed per byte of raw text.
    assert on_disk["val_bits_per_byte"] == pytest.approx(
        on_disk["val_loss"] * on_disk["val_tokens"] / np.log(2) / on_disk["val_bytes"], rel=1e-6)
    assert 0 < on_disk["mfu"] < 1 and on_disk["tokens_per_second"] > 0
    # MFU is over the peak of all 8 devices (logging.peak_flops is per device).
    assert on_disk["num_devices"] == 8 and on_disk["peak_flops_per_device"] == 1e11
    assert on_disk["mfu"] == pytest.approx(on_disk["flops_per_second"] / (8 * 1e11), rel=1e-9)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 40
    assert len(on_disk["samples"]) == 1 and on_disk["samples"][0].startswith("The ")


def test_mixed_precision_remat_and_accumulation_train(shared, tmp_path):
    """bf16 compute with f32 parameters, full remat and 2 micro-batches: still learns."""
    summary = trainer.run(_config(shared, "steps=30", "model.dtype=bfloat16", "model.remat=full",
                                  "optimizer.grad_accum_steps=2", "data.batch_size=16"), str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses[-1] < losses[0] - 0.5, losses
    params = _final_params(tmp_path, 30)
    assert {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype("float32")}
    assert np.isfinite(summary["val_loss"])


def test_blockwise_attention_runs_in_the_trainer(shared, tmp_path):
    """model.block.attention_impl=blockwise reaches the trainer's sharded step (8 devices),
    and its first loss is that of an untrained model, about ln(vocab) (the 0.02-std init
    makes the logits nearly uniform); that blockwise equals xla is
    tests/models/layers/test_flash_attention.py's."""
    config = _config(shared, "steps=1", "schedule.warmup_steps=0", "logging.log_every_steps=1",
                     "eval.every_steps=0", "eval.num_samples=0", "eval.max_batches=1",
                     "checkpoint.save_interval_steps=1000", "model.block.attention_impl=blockwise")
    summary = trainer.run(config, str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert summary["final_step"] == 1 and len(losses) == 1 and np.isfinite(losses).all()
    from data.tokenizer import load_tokenizer

    vocab = load_tokenizer(config.tokenizer.path).vocab_size
    assert abs(losses[0] - np.log(vocab)) < 0.5, (losses, vocab)


def test_context_parallelism_runs_in_the_trainer(shared, tmp_path):
    """sharding.strategy=cp with ring attention trains and evaluates through the trainer (data=2
    x context=4): the first loss is an untrained model's, about ln(vocab); that cp equals one
    device is tests/sharding/test_context.py's."""
    config = _config(shared, "steps=1", "schedule.warmup_steps=0", "logging.log_every_steps=1",
                     "eval.every_steps=0", "eval.num_samples=0", "eval.max_batches=1",
                     "checkpoint.save_interval_steps=1000", "sharding.strategy=cp",
                     "model.block.attention_impl=ring")
    summary = trainer.run(config, str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert summary["final_step"] == 1 and len(losses) == 1 and np.isfinite(summary["val_loss"])
    from data.tokenizer import load_tokenizer

    assert abs(losses[0] - np.log(load_tokenizer(config.tokenizer.path).vocab_size)) < 0.5, losses


def test_relative_workdir(shared, tmp_path, monkeypatch):
    """`python -m train` defaults to ./workdir: a relative path must checkpoint and resume."""
    monkeypatch.chdir(tmp_path)
    trainer.run(_config(shared, "steps=10", "checkpoint.save_interval_steps=5"), "rel")
    assert _committed_steps(tmp_path / "rel") == [5, 10]


def _cli(workdir, overrides):
    cmd = [sys.executable, "-m", "train", "--config=configs/gpt.py:tiny", f"--workdir={workdir}"]
    return cmd + [f"--config.{o}" for o in overrides]


def _committed_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def test_resume_after_sigkill_equals_uninterrupted_run(shared, tmp_path):
    steps = 150
    overrides = [*shared, f"steps={steps}", "checkpoint.save_interval_steps=10", "logging.progress_bar=false",
                 "logging.peak_flops=1e11"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in _committed_steps(killed) if s >= 20]:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _committed_steps(killed)
    assert at_kill and max(at_kill) < steps, at_kill

    resumed = subprocess.run(_cli(killed, overrides), cwd=REPO, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {max(at_kill)}" in resumed.stdout

    reference = tmp_path / "reference"
    trainer.run(load_config(os.path.join(REPO, "configs/gpt.py:tiny"), overrides), str(reference))
    _assert_trees_equal(_final_params(killed, steps), _final_params(reference, steps))


@pytest.mark.parametrize("strategy,mesh", [("zero3", "data=8")])
def test_sharded_resume_equals_uninterrupted_run(shared, tmp_path, capsys, strategy, mesh):
    """`python -m train --config.sharding.strategy=zero3` for 2 steps, resumed to 4 (the sharded
    checkpoint restored into the strategy's layout), ends where 4 uninterrupted steps do."""
    # A constant schedule, so that a 2-step run is the first 2 steps of a 4-step run.
    fixed = ["checkpoint.save_interval_steps=2", "schedule.name=constant", "schedule.warmup_steps=1",
             f"sharding.strategy={strategy}", f"sharding.mesh={mesh}", "logging.tensorboard=false",
             "eval.max_batches=1"]
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    first = subprocess.run(_cli(run_dir, [*shared, "steps=2", "logging.progress_bar=false",
                                          "logging.peak_flops=1e11", *fixed]),
                           cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _committed_steps(run_dir) == [2]
    resumed = _config(shared, "steps=4", *fixed)
    r = trainer.setup(resumed, str(run_dir))
    assert r.mesh.shape == {"data": 8}
    from train.checkpoint import Checkpointer

    with Checkpointer(os.path.join(run_dir, "checkpoints")) as checkpointer:
        _, state, _, _ = checkpointer.restore(r.abstract_state)
    embedding = state.params["embed"]["embedding"]
    assert embedding.sharding == r.abstract_state.params["embed"]["embedding"].sharding
    assert embedding.addressable_shards[0].data.shape[1] == embedding.shape[1] // 8  # split along `embed`

    trainer.run(resumed, str(run_dir))
    assert "resumed from step 2" in capsys.readouterr().out
    trainer.run(_config(shared, "steps=4", *fixed), str(reference))
    _assert_trees_equal(_final_params(run_dir, 4), _final_params(reference, 4))


def test_corrupt_latest_checkpoint_falls_back_and_still_matches(shared, tmp_path):
    """Resume from a workdir whose newest checkpoint is broken: the previous one is used."""
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    # A constant schedule, so that a 20-step run is the first 20 steps of a 30-step run.
    fixed = ("checkpoint.save_interval_steps=10", "schedule.name=constant")
    trainer.run(_config(shared, "steps=20", *fixed), str(run_dir))
    manifest = run_dir / "checkpoints" / "20" / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])  # truncated, as by a crash mid-write
    trainer.run(_config(shared, "steps=30", *fixed), str(run_dir))
    assert any(x.startswith("corrupt.step_20") for x in os.listdir(run_dir / "checkpoints"))  # kept, moved aside
    trainer.run(_config(shared, "steps=30", *fixed), str(reference))
    _assert_trees_equal(_final_params(run_dir, 30), _final_params(reference, 30))


def test_sigterm_saves_a_checkpoint_and_exits(shared, tmp_path):
    overrides = [*shared, "steps=100000", "checkpoint.save_interval_steps=1000", "logging.peak_flops=1e11"]
    proc = subprocess.Popen(_cli(tmp_path, overrides), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    steps = _committed_steps(tmp_path)
    assert len(steps) == 1 and 0 < steps[0] < 1000, steps  # saved off-interval, at the SIGTERM
    assert f"saved a checkpoint at step {steps[0]}" in err


def test_nan_guard_stops_without_saving(shared, tmp_path):
    config = _config(shared, "steps=30", "optimizer.lr=1e8", "optimizer.grad_clip_norm=0.0",
                     "schedule.warmup_steps=0", "checkpoint.save_interval_steps=1")
    with pytest.raises(trainer.NonFiniteLoss, match=r"step \d+: .*not finite.*grad_norm=") as raised:
        trainer.run(config, str(tmp_path))
    failing_step = int(re.match(r"step (\d+):", str(raised.value)).group(1))
    saved = _committed_steps(tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] if (
        tmp_path / "metrics.jsonl").exists() else []
    assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
    # The state after the failing step (and every later one) was never saved; with a save every
    # step, every step before it was, and the last of those holds finite parameters to resume from.
    assert failing_step > 1, "lr=1e8 should leave step 1's loss finite (the test needs a step to keep)"
    assert saved == list(range(1, failing_step))[-len(saved):] and saved, (failing_step, saved)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(_final_params(tmp_path, saved[-1])))


def test_bad_data_path_is_a_clear_error(shared, tmp_path):
    config = _config([shared[1]], "data.source=files:/no/such/file.txt")
    with pytest.raises(FileNotFoundError, match="/no/such/file.txt"):
        trainer.run(config, str(tmp_path))


def test_cli_reports_a_misspelt_key_without_a_traceback(tmp_path):
    out = subprocess.run(_cli(tmp_path, ["optimizer.lrr=1e-3"]), cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode != 0
    assert "config key `optimizer.lrr` does not exist; did you mean `optimizer.lr`?" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_an_empty_sample_prompt_without_bos_fails_before_training(shared, tmp_path):
    """The run ends with samples; with nothing to start them from it says so before it trains."""
    from data.tokenizer.bpe import ByteLevelBPE

    no_bos = ByteLevelBPE.train("the cat sat on the mat. " * 50, vocab_size=300, special_tokens=("</s>",))
    assert no_bos.bos_id is None and no_bos.eos_id is not None
    no_bos.save(tmp_path / "tokenizer")
    config = _config(shared, f"tokenizer.path={tmp_path / 'tokenizer'}", "eval.prompt=")
    with pytest.raises(ValueError, match=r"prompt is empty and the tokenizer has no BOS token.*eval\.prompt"):
        trainer.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
