"""inference/load.py and `python -m inference` on what users bring: a run trained under zero3 on
8 devices decodes on 1, params only, in the dtype asked for; corrupt or truncated weights and
missing paths are one line `error: ...` with no traceback, and the output holds no library logs."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from configs.loader import load_config
from inference.generate import generate_text
from inference.load import load
from tests.cli_output import REPO, assert_one_line_error, run_module
from train import trainer
from train.checkpoint import Checkpointer

LIBRARY_LINE = re.compile(r"^([IWE]\d{4} \d\d:\d\d|(INFO|WARNING|DEBUG):[\w.]+:)|Unable to initialize backend", re.MULTILINE)


def _cli(*args):
    """`python -m inference` on ONE CPU device (the suite's 8-device XLA_FLAGS removed)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return run_module("inference", *args, env={"XLA_FLAGS": flags}, timeout=300)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """(workdir, greedy text of 'The ' from the full sharded restore): 2 steps of the tiny GPT
    under zero3 over the 8 simulated devices."""
    workdir = str(tmp_path_factory.mktemp("zero3"))
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [
        "steps=2", "schedule.warmup_steps=1", "sharding.strategy=zero3", "logging.progress_bar=false",
        "logging.peak_flops=1e11", "eval.max_batches=1", "eval.num_samples=1", "eval.sample_tokens=2",
        "checkpoint.save_interval_steps=2", "checkpoint.async_save=false"])
    trainer.run(config, workdir)
    r = trainer.setup(config, workdir)
    sharded = [x for x in jax.tree_util.tree_leaves(r.abstract_state.params) if not x.sharding.is_fully_replicated]
    assert sharded and all(len(x.sharding.device_set) == 8 for x in sharded)  # really laid out over 8
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        step, state, _, _ = ckpt.restore(r.abstract_state)
    assert step == 2
    text = generate_text(r.model, jax.device_get(state.params), r.tokenizer, ["The "], max_new_tokens=12)[0]
    return workdir, text


def test_a_zero3_run_on_8_devices_decodes_on_1_with_params_only(zero3_run):
    workdir, expected = zero3_run
    result = _cli(f"--checkpoint={workdir}", "--prompt=The ", "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "The " + expected + "\n"
    assert result.stderr.strip() == f"# workdir {workdir}, step 2"  # nothing else: no orbax/absl/jax lines
    loaded = load(workdir)
    assert set(loaded.params) == {"embed", "positions", "final_norm", *(f"layer_{i}" for i in range(2))}
    assert {x.sharding.device_set.pop() for x in jax.tree_util.tree_leaves(loaded.params)} == {jax.devices()[0]}


def test_dtype_restores_and_decodes_in_bfloat16(zero3_run):
    workdir, _ = zero3_run
    loaded = load(workdir, dtype="bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    assert loaded.model.config.block.dtype == jnp.bfloat16
    result = _cli(f"--checkpoint={workdir}", "--prompt=The ", "--max_new_tokens=4", "--dtype=bfloat16")
    assert result.returncode == 0 and result.stdout.startswith("The "), result.stderr[-3000:]
    assert not LIBRARY_LINE.search(result.stderr), result.stderr
    assert_one_line_error(_cli(f"--checkpoint={workdir}", "--dtype=float8"), "--dtype", "float8")


def test_a_flipped_byte_in_the_checkpoint_is_one_line(zero3_run, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(zero3_run[0], workdir)
    chunks = sorted((p for p in (tmp_path / "copy" / "checkpoints" / "2" / "state").rglob("*")
                     if p.is_file() and p.parent.name == "d"), key=lambda p: -p.stat().st_size)
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    chunks[0].write_bytes(bytes(data))
    assert_one_line_error(_cli(f"--checkpoint={workdir}", "--prompt=The "), "step 2", "SHA-256",
                           "pick an older step")


def test_a_truncated_safetensors_shard_is_one_line(tmp_path):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(_cli(f"--checkpoint={tmp_path}", "--prompt=hi"), "model.safetensors is truncated or "
                           "corrupt", "again")


def test_missing_paths_are_one_line(tmp_path):
    assert_one_line_error(_cli(f"--checkpoint={tmp_path / 'missing'}"), "is not a directory")
    assert_one_line_error(_cli("--prompt=hi"), "--checkpoint")
