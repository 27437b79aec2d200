"""`python -m train` as a user meets it (train/__main__.py, train/cli.py): a bad input is one
line `error: ...` and exit 1, before any work and with nothing overwritten; `--verbose` or
LMLAB_DEBUG=1 shows the traceback; a good run prints no library INFO/WARNING lines."""

import hashlib
import os
import re

import jax.numpy as jnp

from configs.loader import load_config
from tests.cli_output import REPO, assert_one_line_error, run_module
from train.checkpoint import Checkpointer

# absl's format (I1202 03:20:44.247 ... file.py:35]), Python's default (WARNING:absl:...), tfds' notice.
LIBRARY_LINE = re.compile(r"^([IWE]\d{4} \d\d:\d\d|(INFO|WARNING|DEBUG):[\w.]+:)|Using custom data configuration|"
                          r"Unable to initialize backend", re.MULTILINE)


def _train(workdir, *overrides, env=None):
    return run_module("train", "--config=configs/gpt.py:tiny", f"--workdir={workdir}",
                   *(f"--config.{o}" for o in overrides), env=env)


def test_a_bad_mesh_is_one_line_before_the_workdir_exists(tmp_path):
    result = _train(tmp_path / "run", "sharding.mesh=data=3")
    assert_one_line_error(result, "`sharding.mesh`", "3 slots", "product is")
    assert not (tmp_path / "run").exists()  # no data prepared, no tokenizer trained, no config.json


def test_a_missing_data_file_is_one_line(tmp_path):
    assert_one_line_error(_train(tmp_path / "run", f"data.source=files:{tmp_path}/missing.txt"),
                          "missing.txt does not exist", "data.source")
    assert not (tmp_path / "run").exists()


def test_bad_flags_and_keys_are_one_line_and_debugging_shows_the_traceback(tmp_path):
    assert_one_line_error(run_module("train", "--no_such_flag"), "no_such_flag", "--helpshort")
    assert_one_line_error(_train(tmp_path, "optimizer.lrr=1e-3"), "`optimizer.lrr` does not exist",
                          "did you mean `optimizer.lr`")
    for debug in ({"LMLAB_DEBUG": "1"}, None):
        args = ["--no_such_flag"] + ([] if debug else ["--verbose"])
        result = run_module("train", *args, env=debug)
        assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_resume_that_changes_shapes_is_refused_and_config_json_is_kept(tmp_path):
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"))
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        ckpt.save(10, {"step": jnp.int32(10)}, data_state={}, config=config.to_dict(), force=True)
    (tmp_path / "config.json").write_text('{"saved": "by the first run"}')
    before = hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest()
    result = _train(tmp_path, "model.block.d_ff=1024")
    assert_one_line_error(result, "other parameter shapes", "model.block.d_ff (256 -> 1024)", "--workdir")
    assert hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.json"]


def test_a_good_run_prints_no_library_log_lines(tmp_path):
    result = _train(tmp_path, "steps=2", "schedule.warmup_steps=1", "logging.progress_bar=false",
                    "logging.peak_flops=1e11", "eval.max_batches=1", "eval.sample_tokens=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: val loss" in result.stdout
    assert not LIBRARY_LINE.search(result.stdout + result.stderr), result.stdout + result.stderr
