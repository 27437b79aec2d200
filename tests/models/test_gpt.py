"""The GPT decoder against Hugging Face GPT-2 on torch, plus its invariants and counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models.gpt import GPT, GPTConfig, scan_params, unscan_params
from models.layers.blocks import BlockConfig
from models.layers.moe import MoEConfig

D, HEADS, FF, VOCAB, MAX_LEN = 32, 4, 64, 50, 16
# For the invariant tests (both sides compiled alike): LLVM -O0 compiles ~3x faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _config(num_layers=2, tie_embeddings=True, remat="none", **block_overrides) -> GPTConfig:
    block = {"d_model": D, "num_heads": HEADS, "d_ff": FF, "mlp_activation": "gelu_tanh", "norm_position": "pre",
             "dropout_rate": 0.0, **block_overrides}
    return GPTConfig(vocab_size=VOCAB, block=BlockConfig(**block), num_layers=num_layers, max_len=MAX_LEN,
                     tie_embeddings=tie_embeddings, remat=remat)


def _ids(batch=2, length=8, seed=0, vocab=VOCAB):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(batch, length)), jnp.int32)


def _init(cfg, ids, seed=0):
    """Random params of the model's shapes, drawn in numpy: compiling flax's threefry init costs
    ~15 s on a loaded CPU. Biases and norm scales are random too, so none hides behind 0 or 1."""
    shapes = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), ids)["params"]))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "embedding" in name:
            std, mean = 0.5, 0.0
        elif "bias" in name:
            std, mean = 0.1, 0.0
        elif "scale" in name:
            std, mean = 0.1, 1.0
        else:  # kernels: fan-in is the D axis of q/k/v [D, ., H], else every axis but the last
            fan_in = leaf.shape[0] if any(k in name for k in ("query", "key", "value")) else \
                int(np.prod(leaf.shape[:-1]))
            std, mean = fan_in**-0.5, 0.0
        return jnp.asarray(mean + std * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(cfg, compiler_options=None):
    """The jitted forward (one compile beats hundreds of eagerly dispatched ops)."""
    model = GPT(cfg)
    return jax.jit(lambda p, ids, **kw: model.apply({"params": p}, ids, **kw), compiler_options=compiler_options)


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": False},
    {"mlp_activation": "swiglu", "norm": "rmsnorm", "num_kv_heads": 2, "use_bias": False},
    {"num_kv_heads": 1, "head_dim": 16, "use_bias": False, "tie_embeddings": False},  # MQA, H * N != D
    {"mlp_activation": "geglu", "norm": "layernorm", "use_bias": True, "num_kv_heads": 2},
], ids=["gpt2", "untied", "llama_like", "mqa_untied_nobias", "geglu_gqa_bias"])
def test_num_params_counts_initialized_params(overrides):
    cfg = _config(**overrides)
    params = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), _ids())["params"]))
    counted = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert cfg.num_params() == counted
    embeddings = VOCAB * D + MAX_LEN * D + (0 if cfg.tie_embeddings else VOCAB * D)
    assert cfg.num_params(include_embeddings=False) == counted - embeddings


def test_flops_per_token_matches_xla_cost_analysis():
    # Wide enough that matmuls dominate the elementwise work XLA also counts.
    B, T = 2, 32
    cfg = GPTConfig(vocab_size=256, num_layers=2, max_len=T, block=BlockConfig(
        d_model=128, num_heads=4, d_ff=512, mlp_activation="gelu_tanh", norm_position="pre", dropout_rate=0.0))
    model = GPT(cfg)
    ids = jnp.zeros((B, T), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), ids)["params"]))
    cost = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ratio = cfg.flops_per_token(T) * B * T / cost["flops"]
    print(f"\nflops_per_token * B*T / XLA flops: {ratio:.4f}")
    assert 0.95 <= ratio <= 1.0


def test_causal_by_gradient_through_position_table():
    # Each position t has its own row of the learned table, so d logits[t] / d row[t'] is the
    # influence of token t' on position t: zero for t' > t, nonzero for t' <= t.
    T = 8
    cfg = _config()
    model = GPT(cfg)
    ids = _ids(batch=1, length=T)
    params = _init(cfg, ids)
    probe_V = jax.random.normal(jax.random.key(1), (VOCAB,))

    def per_position(table):
        p = {**params, "positions": {"embedding": table}}
        return model.apply({"params": p}, ids)[0] @ probe_V  # [T]

    table = params["positions"]["embedding"]
    jac = jax.jit(jax.jacrev(per_position), compiler_options=FAST_COMPILE)(table)  # [T, MAX_LEN, D]
    influence = np.asarray(jnp.max(jnp.abs(jac), axis=-1))  # [T, MAX_LEN]
    later = np.triu(np.ones((T, MAX_LEN), bool), k=1)
    assert np.all(influence[later] == 0.0)
    assert np.all(influence[~later] > 0.0)


def test_packed_row_equals_documents_alone():
    cfg = _config()
    doc_a, doc_b = _ids(1, 5, seed=1), _ids(1, 4, seed=2)
    params = _init(cfg, doc_a)
    pad = jnp.zeros((1, 3), jnp.int32)
    packed = jnp.concatenate([doc_a, doc_b, pad], axis=1)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3], jnp.int32)

    apply = _apply(cfg, FAST_COMPILE)
    packed_logits = apply(params, packed, positions=positions, segment_ids=segment_ids)
    alone_a, alone_b = apply(params, doc_a), apply(params, doc_b)
    assert np.all(np.isfinite(packed_logits))
    np.testing.assert_allclose(packed_logits[:, :5], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_logits[:, 5:9], alone_b, rtol=1e-5, atol=1e-5)


def _loss_and_grads(cfg, params, ids):
    model = GPT(cfg)

    def loss_fn(p):
        logits = model.apply({"params": p}, ids[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    grad_fn = jax.value_and_grad(loss_fn)
    # The policy must really be applied, or the comparison below proves nothing.
    assert ("remat" in str(jax.make_jaxpr(grad_fn)(params))) == (cfg.remat != "none")
    return jax.jit(grad_fn, compiler_options=FAST_COMPILE)(params)


def test_remat_policies_match_no_remat():
    ids = _ids(length=9)
    params = _init(_config(), ids[:, :-1])
    loss_ref, grads_ref = _loss_and_grads(_config(), params, ids)
    for remat in ("full", "dots_saveable", "nothing_saveable"):
        loss, grads = _loss_and_grads(_config(remat=remat), params, ids)
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-6, err_msg=remat)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(grads_ref)
        for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7, err_msg=remat)


def test_bfloat16_compute_is_close_to_float32():
    ids = _ids(length=12)
    params = _init(_config(), ids)  # f32 storage serves both compute dtypes
    logits32 = _apply(_config())(params, ids)
    logits16 = _apply(_config(dtype=jnp.bfloat16))(params, ids)
    assert logits16.dtype == jnp.float32
    error = float(jnp.max(jnp.abs(logits16 - logits32))) / float(jnp.max(jnp.abs(logits32)))
    print(f"\nbf16 vs f32 logits: max |diff| / max |logit| = {error:.3g}")
    assert error < 0.05
    # Same ranking of the vocabulary almost everywhere.
    agree = np.mean(np.asarray(jnp.argmax(logits16, -1) == jnp.argmax(logits32, -1)))
    assert agree >= 0.8


def _gpt2_from_ours(params, cfg: GPTConfig) -> transformers.GPT2LMHeadModel:
    b = cfg.block
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=b.d_model, n_layer=cfg.num_layers,
        n_head=b.num_heads, n_inner=b.d_ff, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=b.norm_eps, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    Dm = b.d_model

    def t(x):
        return torch.tensor(np.asarray(x, np.float32))

    sd = {
        "transformer.wte.weight": t(params["embed"]["embedding"]),
        "transformer.wpe.weight": t(params["positions"]["embedding"]),
        "transformer.ln_f.weight": t(params["final_norm"]["scale"]),
        "transformer.ln_f.bias": t(params["final_norm"]["bias"]),
    }
    for i in range(cfg.num_layers):
        layer, h = params[f"layer_{i}"], f"transformer.h.{i}."
        attn, mlp = layer["self_attention"], layer["mlp"]
        # Conv1D stores [in, out]; the D outputs of q, k and v are head-major (n * H + h), as ours.
        sd[h + "attn.c_attn.weight"] = t(np.concatenate(
            [np.asarray(attn[k]).reshape(Dm, Dm) for k in ("query", "key", "value")], axis=1))
        sd[h + "attn.c_attn.bias"] = t(np.concatenate(
            [np.asarray(attn[k]).reshape(Dm) for k in ("query_bias", "key_bias", "value_bias")]))
        sd[h + "attn.c_proj.weight"] = t(np.asarray(attn["out"]).reshape(Dm, Dm))
        sd[h + "attn.c_proj.bias"] = t(attn["out_bias"])
        sd[h + "mlp.c_fc.weight"] = t(mlp["wi"])
        sd[h + "mlp.c_fc.bias"] = t(mlp["wi_bias"])
        sd[h + "mlp.c_proj.weight"] = t(mlp["wo"])
        sd[h + "mlp.c_proj.bias"] = t(mlp["wo_bias"])
        for ln, ours in (("ln_1", "attention_block"), ("ln_2", "mlp_block")):
            sd[h + ln + ".weight"] = t(layer[ours]["norm"]["scale"])
            sd[h + ln + ".bias"] = t(layer[ours]["norm"]["bias"])
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # Only the tied lm_head (and non-parameter buffers) may be left to the model.
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" or "attn.bias" in k or "masked_bias" in k for k in missing), missing
    hf.tie_weights()
    return hf


def test_gpt2_matches_hf_torch():
    cfg = GPTConfig(vocab_size=100, num_layers=2, max_len=32, tie_embeddings=True, block=BlockConfig(
        d_model=64, num_heads=4, d_ff=256, mlp_activation="gelu_tanh", norm_position="pre", norm_eps=1e-5,
        dropout_rate=0.0, use_bias=True))
    ids = _ids(batch=3, length=32, seed=3, vocab=100)
    params = _init(cfg, ids)
    ours = np.asarray(_apply(cfg)(params, ids))

    hf = _gpt2_from_ours(params, cfg)
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), np.asarray(params["embed"]["embedding"]))
    with torch.no_grad():
        theirs = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    rel = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    print(f"\nGPT-2 vs transformers: max |diff| = {np.max(np.abs(ours - theirs)):.3g}, relative to max |logit| "
          f"{rel:.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.max(np.abs(theirs)))


# --- scanned layers, dense first layers, multi-token prediction -------------------------------------------

def _moe_config(num_layers=3, **kw) -> GPTConfig:
    moe = MoEConfig(num_experts=4, num_experts_per_tok=2, expert_d_ff=16, aux_loss_weight=0.01)
    return dataclasses.replace(_config(num_layers=num_layers, mlp_activation="swiglu", norm="rmsnorm",
                                       use_bias=False, moe=moe), first_dense_layers=1, **kw)


@pytest.mark.parametrize("make", [
    lambda **kw: dataclasses.replace(_config(num_layers=3), **kw),
    lambda **kw: _moe_config(**kw),
    lambda **kw: dataclasses.replace(_config(num_layers=2), remat="full", **kw),
], ids=["gpt2", "moe_dense_first", "remat_full"])
def test_scan_layers_equals_python_loop(make):
    loop_cfg, scan_cfg = make(), make(scan_layers=True)
    ids = _ids(length=9)
    params = _init(loop_cfg, ids[:, :-1])
    stacked = scan_params(params, loop_cfg)
    # The stacked layout is what scan's own init builds, with "layers" as the leading logical axis.
    boxed = jax.eval_shape(lambda: GPT(scan_cfg).init(jax.random.key(0), ids[:, :-1])["params"])
    assert jax.tree_util.tree_structure(nn.unbox(boxed)) == jax.tree_util.tree_structure(stacked)
    for want, got in zip(jax.tree_util.tree_leaves(nn.unbox(boxed)), jax.tree_util.tree_leaves(stacked)):
        assert want.shape == got.shape
    for name in ("dense_layers", "layers"):
        for leaf in jax.tree_util.tree_leaves(boxed.get(name, {}), is_leaf=lambda x: isinstance(x, nn.Partitioned)):
            assert leaf.names[0] == "layers", leaf.names
    assert scan_cfg.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(stacked))
    chex_equal = jax.tree_util.tree_map(np.array_equal, unscan_params(stacked, loop_cfg), params)
    assert all(jax.tree_util.tree_leaves(chex_equal))

    loss, grads = _loss_and_grads(loop_cfg, params, ids)
    scan_loss, scan_grads = _loss_and_grads(scan_cfg, stacked, ids)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    for g, g_ref in zip(jax.tree_util.tree_leaves(unscan_params(scan_grads, loop_cfg)),
                        jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_scanned_moe_router_stats_are_stacked_per_layer():
    loop_cfg, scan_cfg = _moe_config(), _moe_config(scan_layers=True)
    ids = _ids(length=8)
    params = _init(loop_cfg, ids)

    def stats(cfg, p):
        _, state = GPT(cfg).apply({"params": p}, ids, mutable=["intermediates"])
        return state["intermediates"]

    loop, scanned = stats(loop_cfg, params), stats(scan_cfg, scan_params(params, loop_cfg))
    per_layer = [loop[f"layer_{i}"]["mlp"]["router_stats"][0]["tokens_per_expert"] for i in (1, 2)]
    stacked = scanned["layers"]["mlp"]["router_stats"][0]["tokens_per_expert"]
    assert stacked.shape == (2, 4)
    np.testing.assert_array_equal(stacked, np.stack(per_layer))
    assert "router_stats" not in str(jax.tree_util.tree_structure(loop["layer_0"]))  # dense first layer


def test_first_dense_layers_have_a_dense_mlp():
    cfg = _moe_config()
    params = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), _ids())["params"]))
    assert set(params["layer_0"]["mlp"]) == {"wi_gate", "wi_up", "wo"}
    assert params["layer_0"]["mlp"]["wi_gate"].shape == (D, FF)
    assert params["layer_1"]["mlp"]["router"].shape == (D, 4)
    assert cfg.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(params))
    with pytest.raises(ValueError, match="first_dense_layers"):
        dataclasses.replace(_config(), first_dense_layers=1)


def _mtp_logits(cfg, params, ids):
    fn = jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x, mutable=["intermediates"]),
                 compiler_options=FAST_COMPILE)
    logits, state = fn(params, ids)
    return logits, state["intermediates"]["mtp_logits"]


@pytest.mark.parametrize("make", [lambda **kw: dataclasses.replace(_config(num_layers=2), **kw), _moe_config],
                         ids=["dense", "moe"])
def test_multi_token_prediction_counts_causality_and_main_logits(make):
    cfg, plain = make(mtp_depth=2), make()
    T = 10
    ids = _ids(batch=1, length=T)
    params = _init(cfg, ids)
    assert cfg.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(params))
    mtp_size = sum(x.size for k in ("mtp_1", "mtp_2") for x in jax.tree_util.tree_leaves(params[k]))
    assert cfg.mtp_params() == mtp_size and cfg.num_params(include_mtp=False) == plain.num_params()

    logits, mtp = _mtp_logits(cfg, params, ids)
    assert len(mtp) == 2 and all(m.shape == (1, T, VOCAB) for m in mtp)
    main_only = {k: v for k, v in params.items() if not k.startswith("mtp_")}
    np.testing.assert_allclose(logits, _apply(plain, FAST_COMPILE)(main_only, ids), rtol=1e-6, atol=1e-6)

    # Depth k at position i reads tokens up to i + k: changing token j moves positions >= j - k only.
    j = 6
    changed = ids.at[0, j].set((ids[0, j] + 1) % VOCAB)
    _, mtp_changed = _mtp_logits(cfg, params, changed)
    for k, (a, b) in enumerate(zip(mtp, mtp_changed), start=1):
        moved = np.max(np.abs(np.asarray(a - b)), -1)[0] > 0
        np.testing.assert_array_equal(moved, np.arange(T) >= j - k, err_msg=f"depth {k}")
