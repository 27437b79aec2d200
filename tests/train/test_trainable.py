"""train/trainable.py and the frozen part of the state: what a freeze regex freezes stays bit-identical
through training, holds no optimizer state (bytes measured), is laid out like the params, and a
fine-tuning run under fsdp and tp ends where dp ends."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from models.gpt import GPT, llama_config
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from train import program as program_lib
from train import trainable
from train.optimizer import make_optimizer

BATCH, SEQ, VOCAB, STEPS, LR = 16, 16, 128, 3, 3e-3
FREEZE = r"^layer_0/|embed"
EPS32 = float(np.finfo(np.float32).eps)
# Adam's eps: m / (sqrt(v) + eps) of a gradient near 0 amplifies its rounding by 1 / eps (as in
# tests/sharding/conftest.py); 1e-5 keeps the comparison about the layouts.
ADAM_EPS = 1e-5


def _config(**finetune):
    config = base.get_config()
    config.finetune.update(finetune)
    return config


def _model():
    return GPT(llama_config(num_layers=2, d_ff=128, vocab_size=VOCAB, d_model=64, num_heads=4, num_kv_heads=2,
                            max_len=32))


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
    segments = np.tile(np.where(np.arange(SEQ) < SEQ - 3, 1, 0), (BATCH, 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments,
            "positions": np.tile(np.arange(SEQ), (BATCH, 1)).astype(np.int32), "loss_mask": segments}


def test_split_and_combine_are_inverse_and_disjoint():
    params = {"embed": {"embedding": 1}, "layer_0": {"mlp": {"wo": 2, "wo_lora_a": 3}}, "lm_head": 4}
    t, f = trainable.split(params, _config(freeze=FREEZE))
    assert t == {"lm_head": 4} and f == {"embed": {"embedding": 1}, "layer_0": {"mlp": {"wo": 2, "wo_lora_a": 3}}}
    assert trainable.combine(t, f) == params
    t, f = trainable.split(params, _config(method="lora", train="^lm_head$"))
    assert t == {"layer_0": {"mlp": {"wo_lora_a": 3}}, "lm_head": 4}
    assert f == {"embed": {"embedding": 1}, "layer_0": {"mlp": {"wo": 2}}}
    t, _ = trainable.split(params, _config(method="lora"), objective_head="^embed/")
    assert t == {"layer_0": {"mlp": {"wo_lora_a": 3}}, "embed": {"embedding": 1}}

    class Quantized:
        def dequantize(self):
            return 7

    assert trainable.combine({"a": 1}, {"b": {"c": Quantized()}}) == {"a": 1, "b": {"c": 7}}
    with pytest.raises(ValueError, match=r"`finetune.freeze`='nothing' matches no parameter"):
        trainable.split(params, _config(freeze="nothing"))
    with pytest.raises(ValueError, match=r"finetune.method='prefix' found no parameter to train"):
        trainable.split({"embed": 1}, _config(method="prefix"))


@functools.cache
def _run(strategy: str, mesh: str, freeze: str = FREEZE):
    """STEPS Adam steps of the tiny model with `freeze` frozen; (program, first state, last state, metrics)."""
    chosen = get_strategy(strategy)
    config = _config(freeze=freeze)
    tx = make_optimizer(learning_rate=LR, eps=ADAM_EPS)
    program = program_lib.build(_model(), tx, lambda step: LR, strategy=chosen, mesh=mesh_lib.make_mesh(mesh),
                                seq_len=SEQ, batch_size=BATCH,
                                split=functools.partial(trainable.split, config=config) if freeze else None)
    first = program.init(jax.random.key(0))
    start = jax.device_get(first)
    batch = {k: jax.device_put(v, program.layout.batch) for k, v in _batch().items()}
    state, metrics = first, []
    for _ in range(STEPS):
        state, m = program.step(state, batch, jax.random.key(1))
        metrics.append(jax.device_get(m))
    return program, start, jax.device_get(state), metrics, state


def test_frozen_parameters_are_bit_identical_and_hold_no_optimizer_state():
    program, start, end, metrics, _ = _run("dp", "data=8")
    frozen_paths = trainable.paths(start.frozen)
    assert frozen_paths and all(p.startswith("layer_0/") or "embed" in p for p in frozen_paths)
    assert not any(p.startswith("layer_0/") for p in trainable.paths(start.params))
    for x, y in zip(jax.tree_util.tree_leaves(start.frozen), jax.tree_util.tree_leaves(end.frozen)):
        np.testing.assert_array_equal(x, y)
    # Control: the trainable parameters did move.
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(start.params),
                                                        jax.tree_util.tree_leaves(end.params)))
    # Adam's state is two moments per trainable parameter and a count: measured in bytes, it is
    # 2 x the trainable bytes (+ the count), whatever the frozen bytes.
    def nbytes(tree):
        return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))

    scalars = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(end.opt_state) if np.ndim(x) == 0)
    assert nbytes(end.opt_state) - scalars == 2 * nbytes(end.params)
    _, full_start, full_end, _, _ = _run("dp", "data=8", "")
    assert nbytes(full_end.opt_state) - scalars == 2 * (nbytes(end.params) + nbytes(end.frozen))
    assert nbytes(end.frozen) > 0.3 * nbytes(full_end.params)  # a real share of the model is frozen
    # Every frozen leaf is laid out by the layout, replicated under dp.
    assert jax.tree_util.tree_structure(program.layout.state.frozen) == jax.tree_util.tree_structure(start.frozen)


@pytest.mark.parametrize("strategy, mesh", [("fsdp", "fsdp=8"), ("tp", "data=4,tensor=2")])
def test_a_frozen_run_under_fsdp_and_tp_equals_dp(strategy, mesh):
    assert jax.device_count() == 8
    _, start, dp_end, dp_metrics, _ = _run("dp", "data=8")
    program, start_other, end, metrics, state = _run(strategy, mesh)
    # The same init whatever the layout, and the frozen part laid out by the strategy (ZeRO-3
    # splits it under fsdp, tp splits its heads / mlp).
    for x, y in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(start_other)):
        np.testing.assert_array_equal(x, y)
    split = [leaf for leaf in jax.tree_util.tree_leaves(state.frozen) if len(leaf.sharding.device_set) == 8
             and leaf.sharding.shard_shape(leaf.shape) != leaf.shape]
    assert split, "no frozen leaf is split over the devices"
    for x, y in zip(jax.tree_util.tree_leaves(end.frozen), jax.tree_util.tree_leaves(start.frozen)):
        np.testing.assert_array_equal(x, y)
    # A gradient element is a sum over the N = B*T tokens, summed in another order by another
    # layout: it moves by about 4 EPS32 sqrt(N) times the rms element |g| / sqrt(P); Adam's
    # update moves by at most lr * dg / eps for it (a gradient near 0), and the steps add up.
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(end.params))
    dg = [4 * EPS32 * math.sqrt(BATCH * SEQ) * float(m["grad_norm"]) / math.sqrt(num_params) for m in dp_metrics]
    atol = STEPS * LR * max(dg) / ADAM_EPS
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(end.params), jax.tree_util.tree_leaves(dp_end.params)):
        np.testing.assert_allclose(x, y, rtol=2 * EPS32, atol=atol, err_msg=jax.tree_util.keystr(path))
    for m, d in zip(metrics, dp_metrics):
        np.testing.assert_allclose(m["loss"], d["loss"], rtol=4 * EPS32 * math.sqrt(BATCH * SEQ))


def test_the_peft_method_of_finetune_rides_on_the_blocks():
    from train import build

    config = base.get_config()
    assert build.peft(config) is None and build.model(config, 300).config.block.peft is None
    config.finetune.update(method="qlora")
    config.finetune.lora.update(rank=4, alpha=8.0, rslora=True)
    peft = build.model(config, 300).config.block.peft
    assert (peft.lora.rank, peft.lora.alpha, peft.lora.rslora, peft.lora.targets) == (
        4, 8.0, True, config.finetune.lora.targets)
    config.finetune.update(method="adapter")
    config.finetune.adapter.update(kind="parallel", hidden=12)
    assert build.peft(config).adapter.kind == "parallel" and build.peft(config).adapter.hidden == 12
    config.finetune.update(method="prefix")
    assert build.peft(config).prefix.length == config.finetune.prefix.length
