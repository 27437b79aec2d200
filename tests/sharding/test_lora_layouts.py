"""LoRA / DoRA factors carry logical axis names, so every strategy lays them out: under dp, fsdp
and tp on the 8 simulated devices the LoRA model compiles, its factors are split where their
kernel's axes are, and its logits and LoRA gradients equal one device's (float32 rounding)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from models.gpt import GPT, llama_config
from models.layers.peft import LoraConfig, PeftConfig, is_peft_path
from sharding import layout as layout_lib
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy

EPS32 = float(np.finfo(np.float32).eps)
LORA = LoraConfig(targets=r"self_attention/(query|key|value|out)$|mlp/|embedding$|lm_head", rank=4, alpha=8.0,
                  dora=True)
LAYOUTS = [("dp", "data=8"), ("fsdp", "data=2,fsdp=4"), ("tp", "data=4,tensor=2")]


def _model() -> GPT:
    return GPT(llama_config(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128,
                            max_len=32, peft=PeftConfig(lora=LORA)))


def _batch():
    return (np.arange(8 * 16).reshape(8, 16) * 13 + 1) % 128


def _params(model, ids):
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
    rng = np.random.default_rng(0)

    def nonzero(path, x):  # B = 0 would hide a misplaced factor
        name = str(path[-1].key)
        return jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype) if name.endswith(("_lora_a", "_lora_b")) else x

    return jax.device_get(jax.tree_util.tree_map_with_path(nonzero, params))


def _loss(model, params, ids):
    logits = model.apply({"params": params}, ids)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])


@pytest.fixture(scope="module")
def reference():
    model, ids = _model(), _batch()
    params = _params(model, ids)
    logits = model.apply({"params": params}, ids)
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, ids))(params)
    return params, np.asarray(logits), float(loss), jax.device_get(grads)


@pytest.mark.parametrize("strategy,mesh", LAYOUTS)
def test_lora_under_strategy_equals_one_device(strategy, mesh, reference):
    params, want_logits, want_loss, want_grads = reference
    model, ids = _model(), _batch()
    chosen, mesh = get_strategy(strategy), mesh_lib.make_mesh(mesh)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])
    shardings = layout_lib.param_shardings(chosen, mesh, boxed, zero=chosen.zero_stage >= 3)
    rules = chosen.activation_rules(mesh)
    batch = NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch", None), rules))

    def step(p, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            logits = model.apply({"params": p}, x)
            loss, grads = jax.value_and_grad(lambda q: _loss(model, q, x))(p)
        return logits, loss, grads

    compiled = jax.jit(step, in_shardings=(shardings, batch), out_shardings=(None, None, shardings))
    logits, loss, grads = compiled(jax.device_put(params, shardings), jax.device_put(ids, batch))

    attn = shardings["layer_0"]["self_attention"]
    if strategy == "tp":  # B's output axes follow the kernel's heads; A's input axis stays whole
        assert "tensor" in str(attn["query_lora_b"].spec) and "tensor" not in str(attn["query_lora_a"].spec)
        assert "tensor" in str(attn["out_lora_a"].spec)
    if strategy == "fsdp":
        assert "fsdp" in str(attn["query_lora_a"].spec)
    # Two layers of width <= 128 summed in another order: a few eps per matmul, ~10 matmuls.
    tol = 4 * EPS32 * math.sqrt(128) * 10
    scale = np.max(np.abs(want_logits))
    assert np.max(np.abs(np.asarray(logits) - want_logits)) <= tol * scale
    assert abs(float(loss) - want_loss) <= tol * abs(want_loss)
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(grads))
    want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    lora_leaves = [(path, g) for path, g in flat if is_peft_path(jax.tree_util.keystr(path, simple=True,
                                                                                      separator="/"))]
    assert lora_leaves
    for path, g in lora_leaves:
        ref = np.asarray(want[path])
        assert np.linalg.norm(np.asarray(g) - ref) <= 10 * tol * np.linalg.norm(ref) + 1e-12, path
