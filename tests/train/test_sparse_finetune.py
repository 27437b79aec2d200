"""Sparse fine-tuning (`finetune.keep_sparsity`): a trainer run from a pruned checkpoint keeps
exactly its zeros while the weights and the loss move; without the switch AdamW revives them."""

import json
import os

import jax
import numpy as np
import pytest

from compress import io, masks
from configs.loader import load_config
from inference.load import load
from train import trainer, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4


def _config(root, *overrides):
    return load_config(os.path.join(REPO, "configs/llama.py:tiny"), [
        f"data.data_dir={root / 'tfds'}", "logging.progress_bar=false", "logging.peak_flops=1e11",
        f"steps={STEPS}", "schedule.warmup_steps=1", f"checkpoint.save_interval_steps={STEPS}",
        "eval.max_batches=1", "eval.num_samples=0", "logging.log_every_steps=1", *overrides])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny LLaMA run, pruned to 50% by `python -m compress`'s door (compress.io)."""
    root = tmp_path_factory.mktemp("sparse")
    trainer.run(_config(root), str(root / "run"))
    out = io.compress(str(root / "run"), "magnitude", str(root / "pruned"), options=["sparsity=0.5"])
    assert out.info["sparsity"] == pytest.approx(0.5, abs=1e-3)
    return root, load(str(root / "pruned")).params


def _finetune(root, name, *overrides):
    config = _config(root, f"init_from=run:{root / 'pruned'}", "optimizer.lr=0.01", "optimizer.weight_decay=0.5",
                     *overrides)
    summary = trainer.run(config, str(root / name))
    return summary, load(str(root / name)).params


def test_keep_sparsity_holds_the_zeros_while_the_loss_moves(pruned):
    root, start = pruned
    _, params = _finetune(root, "sparse", "finetune.keep_sparsity=true")
    before, after = masks.prunable(start), masks.prunable(params)
    for path in before:
        was_zero, is_zero = np.asarray(before[path]) == 0, np.asarray(after[path]) == 0
        np.testing.assert_array_equal(is_zero, was_zero, err_msg="/".join(path))
        live = ~was_zero
        assert (np.asarray(after[path])[live] != np.asarray(before[path])[live]).mean() > 0.9  # they trained
    assert masks.sparsity(params) == pytest.approx(0.5, abs=1e-3)
    with open(root / "sparse" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it learns, within the fixed pattern


def test_without_keep_sparsity_adamw_revives_the_pruned_weights(pruned):
    root, start = pruned
    _, params = _finetune(root, "dense")
    after = masks.prunable(params)
    pruned_weights = [np.asarray(w) == 0 for w in masks.prunable(start).values()]
    revived = [(np.asarray(after[p]) != 0) & (np.asarray(w) == 0) for p, w in masks.prunable(start).items()]
    # Weight decay alone leaves a zero at zero; the gradients through Adam move nearly every one.
    assert sum(r.sum() for r in revived) > 0.9 * sum(z.sum() for z in pruned_weights)


def test_keep_sparsity_needs_a_starting_checkpoint_and_full_finetuning(tmp_path):
    config = _config(tmp_path, "finetune.keep_sparsity=true")
    with pytest.raises(ValueError, match="init_from is empty"):
        validate.check_finetune(config)
    config = _config(tmp_path, "finetune.keep_sparsity=true", "finetune.method=lora", "init_from=run:/x")
    with pytest.raises(ValueError, match="finetune.method='lora'"):
        validate.check_finetune(config)


def test_hold_zeros_masks_grads_and_updates_of_prunable_kernels_only():
    import optax

    from train.optimizer import make_optimizer
    params = {"layer_0": {"mlp": {"wi": np.array([[0.0, 1.0], [2.0, 0.0]], np.float32),
                                  "wi_bias": np.zeros(2, np.float32)}},
              "embed": {"embedding": np.array([[0.0, 1.0]], np.float32)}}
    grads = jax.tree_util.tree_map(lambda x: np.ones_like(x), params)
    tx = make_optimizer(learning_rate=0.1, weight_decay=0.5, keep_zeros=True)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(np.asarray(new["layer_0"]["mlp"]["wi"]) == 0, [[True, False], [False, True]])
    assert (np.asarray(new["layer_0"]["mlp"]["wi_bias"]) != 0).all()  # not a prunable kernel: trains
    assert np.asarray(new["embed"]["embedding"])[0, 0] != 0


def test_a_shrunk_checkpoint_loads_and_generates_as_the_pruned_params(pruned):
    """prune_heads through `python -m compress`'s door: the saved workdir loads (inference.load)
    as the smaller model, its params are the method's, and it decodes with the KV cache the
    tokens a full recompute of its own logits chooses (greedy)."""
    from inference.generate import generate

    root, _ = pruned
    out = io.compress(str(root / "run"), "prune_heads", str(root / "heads"), options=["sparsity=0.5"],
                      calibration_samples=4, calibration_seq_len=32)
    loaded = load(str(root / "heads"))
    block = loaded.model.config.block
    assert (block.num_heads, block.num_kv_heads, block.head_dim) == (2, 1, 16)
    for got, want in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(out.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    prompt = loaded.tokenizer.encode("def ")
    tokens = generate(loaded.model, loaded.params, [prompt], max_new_tokens=6)[0]
    ids = list(prompt)
    for token in tokens:  # each cached-decode token is a greedy choice of the full recompute
        logits = np.asarray(loaded.model.apply({"params": loaded.params}, np.asarray([ids], np.int32)))[0, -1]
        # within float32 rounding of the best (the cache and the recompute sum in different orders)
        assert logits[token] >= logits.max() - 64 * np.finfo(np.float32).eps * np.abs(logits).max()
        ids.append(token)
    assert len(tokens) == 6
