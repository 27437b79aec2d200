"""LoRA, rsLoRA and DoRA in the layers (`models/layers/peft.py`): the activation-level update
equals the weight-level definition computed in float64 numpy, B = 0 leaves the base model,
merge / unmerge are exact up to float rounding, the base params are a subset of the LoRA
model's, and bad targets or ranks are one-line errors."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.bert import BertConfig, BertForMaskedLM
from models.gpt import GPT, GPTConfig, llama_config, mixtral_config, scan_params
from models.layers.blocks import BlockConfig
from models.layers.peft import LoraConfig, PeftConfig, is_peft_path, merge, unmerge

EPS32 = float(np.finfo(np.float32).eps)
SMALL = {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "d_ff": 64,
         "max_len": 32}
ALL = "self_attention/(query|key|value|out)|mlp/(wi|wi_gate|wi_up|wo)$|embedding$|lm_head"
# A tied table's LoRA changes the lookup only (peft's semantics), not the tied output projection,
# so the weight-level fold below holds for untied tables.
UNTIED = {"llama": ALL, "bert": "self_attention/|mlp/", "gpt2": "self_attention/|mlp/"}


def with_lora(config, **lora):
    lora.setdefault("targets", ALL)
    peft = PeftConfig(lora=LoraConfig(**lora))
    return dataclasses.replace(config, block=dataclasses.replace(config.block, peft=peft))


def llama(**lora) -> GPT:
    config = llama_config(**SMALL)
    return GPT(with_lora(config, **lora) if lora else config)


def gpt2_like(**lora) -> GPT:
    """Learned positions, LayerNorm, biases (DoRA must not rescale them), tied embeddings."""
    block = BlockConfig(d_model=32, num_heads=4, d_ff=64, mlp_activation="gelu_tanh", norm_position="pre",
                        dropout_rate=0.0)
    config = GPTConfig(vocab_size=64, block=block, num_layers=2, max_len=32)
    return GPT(with_lora(config, **lora) if lora else config)


def bert(**lora) -> BertForMaskedLM:
    block = BlockConfig(d_model=32, num_heads=4, d_ff=64, mlp_activation="gelu", dropout_rate=0.0)
    config = BertConfig(vocab_size=64, block=block, num_layers=2, max_len=32)
    return BertForMaskedLM(with_lora(config, **lora) if lora else config)


FAMILIES = {"llama": llama, "gpt2": gpt2_like, "bert": bert}
IDS = (np.arange(2 * 12).reshape(2, 12) * 7 + 3) % 64


def init(model, seed=0):
    return nn.unbox(model.init(jax.random.key(seed), jnp.asarray(IDS))["params"])


def flat(params):
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)}


def unflat(leaves):
    out = {}
    for path, value in leaves.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = jnp.asarray(value)
    return out


def randomize(params, seed=1):
    """Nonzero B (and A, magnitude) so that the update is there to get wrong."""
    rng = np.random.default_rng(seed)
    leaves = flat(params)
    for path, value in leaves.items():
        if path.endswith(("_lora_a", "_lora_b")):
            leaves[path] = rng.normal(0, 0.3, value.shape).astype(np.float32)
        elif path.endswith("_lora_magnitude"):
            leaves[path] = (value * rng.uniform(0.5, 1.5, value.shape)).astype(np.float32)
    return unflat(leaves)


def fold64(leaves, lora: LoraConfig):
    """The base params with every LoRA kernel folded in float64: W + s A B, or DoRA's
    m (W + s A B) / ||W + s A B|| (norm over the input axes, one per output feature)."""
    out = {k: v for k, v in leaves.items() if not is_peft_path(k)}
    for path in [k.removesuffix("_lora_a") for k in leaves if k.endswith("_lora_a")]:
        w, a, b = (np.asarray(leaves[path + s], np.float64) for s in ("", "_lora_a", "_lora_b"))
        n_in = a.ndim - 1
        updated = w + lora.scale * np.tensordot(a, b, axes=1)
        if path + "_lora_magnitude" in leaves:
            norm = np.sqrt(np.sum(updated ** 2, axis=tuple(range(n_in))))
            updated = updated * np.asarray(leaves[path + "_lora_magnitude"], np.float64) / norm
        out[path] = updated
    return out


def bound(logits, depth=2, width=64):
    """Float32 rounding of two evaluations of the same network: a few eps per matmul of
    length `width` (random-walk sqrt), ~8 matmuls per layer, relative to the logits' scale."""
    return 4 * EPS32 * math.sqrt(width) * 8 * depth * float(np.max(np.abs(logits)))


@pytest.mark.parametrize("family", FAMILIES)
def test_b_zero_at_init_is_the_base_model_and_base_params_are_a_subset(family):
    make = FAMILIES[family]
    params = init(make(rank=4))
    leaves = flat(params)
    lora_leaves = {k for k in leaves if is_peft_path(k)}
    # A base checkpoint loads into the LoRA model: same names and shapes, LoRA leaves aside.
    base_shapes = {"/".join(str(k.key) for k in path): v.shape for path, v in
                   jax.tree_util.tree_leaves_with_path(jax.eval_shape(lambda: init(make())))}
    assert lora_leaves and {k: v.shape for k, v in leaves.items() if k not in lora_leaves} == base_shapes
    base_params = unflat({k: v for k, v in leaves.items() if k not in lora_leaves})
    b_leaves = [k for k in lora_leaves if k.endswith("_lora_b") and "embedding" not in k]
    assert b_leaves and all(not leaves[k].any() for k in b_leaves)
    np.testing.assert_array_equal(np.asarray(make(rank=4).apply({"params": params}, IDS)),
                                  np.asarray(make().apply({"params": base_params}, IDS)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", [{}, {"rslora": True}, {"dora": True}, {"dora": True, "rslora": True}])
def test_update_equals_float64_weight_level_reference_and_merge(family, variant):
    make = FAMILIES[family]
    lora = LoraConfig(targets=UNTIED[family], rank=4, alpha=6.0, **variant)
    model = make(targets=UNTIED[family], rank=4, alpha=6.0, **variant)
    params = randomize(init(model))
    got = np.asarray(model.apply({"params": params}, IDS))
    folded = fold64(flat(params), lora)
    base = make()
    want = np.asarray(base.apply({"params": unflat({k: v.astype(np.float32) for k, v in folded.items()})}, IDS))
    tol = bound(want)
    assert np.max(np.abs(got - want)) <= tol
    assert np.max(np.abs(got - np.asarray(base.apply({"params": init(base)}, IDS)))) > 100 * tol  # LoRA is there

    base_model, merged = merge(model, params)
    assert base_model.config.block.peft is None and not any(is_peft_path(k) for k in flat(merged))
    assert np.max(np.abs(np.asarray(base_model.apply({"params": merged}, IDS)) - got)) <= tol
    for k, v in flat(merged).items():  # merge's kernels are the float64 fold, rounded
        np.testing.assert_allclose(v, folded[k], rtol=0, atol=8 * EPS32 * max(1.0, np.abs(folded[k]).max()))


@pytest.mark.parametrize("dora", [False, True])
def test_unmerge_recovers_the_base_kernels(dora):
    model = llama(rank=4, dora=dora)
    params = randomize(init(model))
    _, merged, norms = merge(model, params, return_norms=True)
    assert bool(norms) == dora
    restored = flat(unmerge(model, merged, params, norms))
    original = flat(params)
    assert set(restored) == set(original)
    for k, v in original.items():
        # W' = W + s A B rounds once, W' - s A B once more: a few eps of |W| + s |A B|.
        scale = np.abs(v).max() + model.config.block.lora.scale * 0.3 * 0.3 * 4 * 8
        np.testing.assert_allclose(restored[k], v, rtol=0, atol=16 * EPS32 * scale)
    if dora:
        with pytest.raises(ValueError, match="column norm"):
            unmerge(model, merged, params)


def test_scanned_layers_equal_the_loop():
    model = llama(rank=4, dora=True)
    params = randomize(init(model))
    scanned = GPT(dataclasses.replace(model.config, scan_layers=True))
    got = scanned.apply({"params": scan_params(params, model.config)}, IDS)
    want = model.apply({"params": params}, IDS)
    assert np.max(np.abs(np.asarray(got) - np.asarray(want))) <= bound(want)
    _, merged = merge(scanned, scan_params(params, model.config))  # stacked factors fold per layer
    np.testing.assert_allclose(merged["layers"]["self_attention"]["query"][1],
                               merge(model, params)[1]["layer_1"]["self_attention"]["query"], rtol=0, atol=1e-6)


def test_dropout_acts_on_the_low_rank_branch_only():
    model = llama(rank=4, dropout=0.5)
    params = init(model)
    rngs = {"dropout": jax.random.key(3)}
    # B = 0: the branch adds nothing, so dropout changes nothing.
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, IDS, deterministic=False, rngs=rngs)),
                                  np.asarray(model.apply({"params": params}, IDS)))
    params = randomize(params)
    a = model.apply({"params": params}, IDS, deterministic=False, rngs=rngs)
    b = model.apply({"params": params}, IDS, deterministic=False, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_targets_select_kernels_by_path():
    params = flat(init(llama(targets=r"layer_1/self_attention/(query|value)$", rank=2)))
    assert sorted(k for k in params if is_peft_path(k)) == [
        "layer_1/self_attention/query_lora_a", "layer_1/self_attention/query_lora_b",
        "layer_1/self_attention/value_lora_a", "layer_1/self_attention/value_lora_b"]
    assert params["layer_1/self_attention/query_lora_a"].shape == (32, 2)
    assert params["layer_1/self_attention/query_lora_b"].shape == (2, 4, 8)


def test_lora_params_carry_logical_axis_names():
    boxed = jax.eval_shape(lambda: llama(rank=4, dora=True).init(jax.random.key(0), jnp.asarray(IDS))["params"])
    attn = boxed["layer_0"]["self_attention"]
    assert attn["out_lora_a"].names == ("heads", "head_dim", None)
    assert attn["out_lora_b"].names == (None, "embed")
    assert attn["key_lora_b"].names == (None, "kv_heads", "head_dim")
    assert attn["key_lora_magnitude"].names == ("kv_heads", "head_dim")
    assert boxed["embed"]["embedding_lora_a"].names == ("vocab", None)
    assert boxed["lm_head_lora_b"].names == (None, "vocab")


def test_bad_targets_and_ranks_are_one_line_errors():
    with pytest.raises(ValueError, match=r"finetune.lora.targets='nothing_here' matches no kernel") as e:
        init(llama(targets="nothing_here"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"finetune.lora.rank=40 exceeds kernel layer_0/self_attention/query"):
        init(llama(targets="query", rank=40))
    moe = GPT(with_lora(mixtral_config(**SMALL, num_experts=4), targets="mlp/wi"))
    with pytest.raises(ValueError, match=r"matches layer_0/mlp/wi_gate, a mixture-of-experts kernel"):
        init(moe)
    # Attention of the same MoE model is fine.
    init(GPT(with_lora(mixtral_config(**SMALL, num_experts=4), targets="self_attention/query")))
    tied = llama(targets="embedding", rank=2)
    tied = GPT(dataclasses.replace(tied.config, tie_embeddings=True))
    with pytest.raises(ValueError, match="tied embedding table cannot be merged"):
        merge(tied, init(tied))
