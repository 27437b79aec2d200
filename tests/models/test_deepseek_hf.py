"""DeepSeek-V3 (models/deepseek.py, models/convert/deepseek.py) against transformers'
DeepseekV3ForCausalLM on torch, and the MoE routing pieces it adds (group-limited routing,
the correction bias and its update) against float64 numpy references.

Small random HF models are built here (no download), their weights, correction biases
included, randomised; measured errors are printed (run with `-s`).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.core import FrozenDict

from models import hf as hf_io
from models.convert.deepseek import config_from_hf, hf_to_params, params_to_hf
from models.deepseek import deepseek_v3_config
from models.gpt import GPT, scan_params, unscan_params
from models.layers.mla import mla_softmax_scale
from models.layers.moe import MoEConfig, MoEFeedForward, route, total_aux_loss, update_correction_bias
from models.layers.positional import RopeConfig

VOCAB, D, LAYERS = 61, 32, 3
COMMON = {"vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": LAYERS, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-5, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 40,
          "moe_intermediate_size": 12, "n_routed_experts": 8, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
          "qk_rope_head_dim": 4, "v_head_dim": 8, "routed_scaling_factor": 2.5}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}
CASES = {
    # q latent, 4 groups of 2 keeping 2, 1 of 3 layers dense, YaRN with mscale and mscale_all_dim.
    "q_lora_groups_yarn_mscale": {
        "q_lora_rank": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "norm_topk_prob": True,
        "rope_parameters": {**YARN, "mscale": 0.8, "mscale_all_dim": 1.0}},
    # plain q projection, 2 groups keeping 1, no dense layer, weights not renormalised.
    "plain_q_no_norm_topk": {
        "q_lora_rank": None, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "n_shared_experts": 2,
        "first_k_dense_replace": 0, "norm_topk_prob": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    # attention biases, rotate-half RoPE, YaRN with mscale_all_dim only, tied embeddings.
    "bias_rotate_half_tied": {
        "q_lora_rank": 16, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "attention_bias": True, "rope_interleave": False,
        "tie_word_embeddings": True, "rope_parameters": {**YARN, "mscale_all_dim": 0.707}},
}
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _ids(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


@functools.cache
def _hf_model(case: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.DeepseekV3Config(**COMMON, **CASES[case]), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a bias that changes which experts win
                buffer.copy_(0.2 * torch.randn_like(buffer))
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@functools.cache
def _forward(cfg):
    model = GPT(cfg)
    return jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=FAST_COMPILE)


def _our_logits(cfg, params, ids):
    return np.asarray(_forward(cfg)(params, jnp.asarray(ids, jnp.int32)))


def _moe_layers(cfg):
    return range(cfg.first_dense_layers, cfg.num_layers)


@pytest.mark.parametrize("case", CASES)
def test_deepseek_v3_logits_match_hf_torch(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.first_dense_layers == CASES[case]["first_k_dense_replace"]
    params = hf_to_params(hf.state_dict(), cfg)
    ids = _ids()
    ours, theirs = _our_logits(cfg, params, ids), _hf_logits(hf, ids)
    scale = np.max(np.abs(theirs))
    err = np.max(np.abs(ours - theirs))
    print(f"\n{case} vs transformers: max |diff| = {err:.3g}, relative {err / scale:.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
    # The random correction bias must matter, or the test would not check that it is applied.
    unbiased = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "score_correction_bias" in jax.tree_util.keystr(path) else x, params)
    assert np.max(np.abs(_our_logits(cfg, unbiased, ids) - theirs)) > 100 * 1e-4 * scale


@pytest.mark.parametrize("case", CASES)
def test_deepseek_v3_num_params_equals_hf_torch_parameters(case):
    """num_params counts what `init` creates and the checkpoint stores: torch's `parameters()`
    plus the correction biases, which are buffers there (one [E] per MoE layer)."""
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    params = hf_to_params(hf.state_dict(), cfg)
    buffers = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
    assert buffers == len(_moe_layers(cfg)) * cfg.block.moe.buffer_params() > 0
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + buffers
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == cfg.num_params()
    attention = hf.model.layers[0].self_attn
    assert cfg.block.attention_params() == sum(p.numel() for p in attention.parameters())


def test_deepseek_v3_full_size_preset_matches_hf_defaults():
    """The preset's defaults are transformers' DeepseekV3Config(); 671B stored values: torch's
    parameters (on the meta device) plus the 58 MoE layers' [256] correction-bias buffers, as
    `init` builds them (shapes only)."""
    hf_config = transformers.DeepseekV3Config()
    cfg = deepseek_v3_config()
    assert config_from_hf(hf_config.to_dict()) == cfg
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(hf_config)
    assert sum(p.numel() for p in hf.parameters()) == 671_026_404_352
    assert cfg.num_params() == 671_026_404_352 + (61 - 3) * 256 == 671_026_419_200
    shapes = jax.eval_shape(GPT(dataclasses.replace(cfg, scan_layers=True)).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))
    leaves = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(shapes["params"])))
    assert leaves == cfg.num_params()


# deepseek-ai/DeepSeek-V3's config.json (transformers 4.x keys, FP8 quantisation left out).
RELEASED_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280,
}


def test_deepseek_v3_released_config_maps_to_yarn_preset_as_hf_reads_it():
    cfg = config_from_hf(RELEASED_CONFIG)
    rope = RopeConfig(theta=10000.0, interleaved=True, scaling="yarn", factor=40.0, original_max_len=4096,
                      mscale=1.0, mscale_all_dim=1.0)
    assert cfg == deepseek_v3_config(max_len=163840, rope=rope)
    hf_config = transformers.DeepseekV3Config(**{k: v for k, v in RELEASED_CONFIG.items()
                                                 if k not in ("architectures", "model_type", "moe_layer_freq",
                                                              "scoring_func", "topk_method")})
    assert config_from_hf(hf_config.to_dict()) == cfg  # the same through transformers' own reading
    # softmax attention scale (P + R)^-0.5 * mscale^2, as transformers' DeepseekV3Attention.scaling
    with torch.device("meta"):
        attention = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention(hf_config, 0)
    assert mla_softmax_scale(192, cfg.block.rope) == pytest.approx(attention.scaling, rel=1e-12)
    with pytest.raises(ValueError, match="scoring_func"):
        config_from_hf({**RELEASED_CONFIG, "scoring_func": "softmax"})


def test_deepseek_v3_attention_flops_count_mla_shapes_hf():
    b = deepseek_v3_config().block
    N, P, R, H, T = 128, 128, 64, 128, 4096
    assert b.attention_score_flops(T) == 2 * N * (P + R) * T + 2 * N * H * T
    assert b.attention_weights() == 7168 * 1536 + 1536 * N * (P + R) + 7168 * (512 + R) + 512 * N * (P + H) + N * H * 7168


@pytest.mark.parametrize("case", ["q_lora_groups_yarn_mscale", "bias_rotate_half_tied"])
def test_deepseek_v3_state_dict_round_trip_is_exact_hf(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    sd = params_to_hf(hf_to_params(hf.state_dict(), cfg), cfg)
    want = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert sd.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(sd[name], value, err_msg=name)


def test_deepseek_v3_reads_per_expert_checkpoint_and_ignores_mtp_layer_hf(tmp_path):
    """transformers' save_pretrained writes one tensor per expert; DeepSeek's files add the
    MTP layer `model.layers.{L}.*`, which transformers and we drop."""
    hf = _hf_model("q_lora_groups_yarn_mscale")
    hf.save_pretrained(tmp_path)
    tensors = hf_io.read_safetensors(str(tmp_path))
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in tensors
    tensors.update({f"model.layers.{LAYERS}.eh_proj.weight": np.zeros((D, 2 * D), np.float32),
                    f"model.layers.{LAYERS}.mlp.experts.0.gate_proj.weight": np.zeros((12, D), np.float32)})
    cfg = config_from_hf(hf.config.to_dict())
    jax.tree_util.tree_map(np.testing.assert_array_equal, hf_to_params(tensors, cfg),
                           hf_to_params(hf.state_dict(), cfg))


def test_deepseek_v3_missing_and_unexpected_tensors_are_named_hf():
    hf = _hf_model("q_lora_groups_yarn_mscale")
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    del sd["model.layers.2.mlp.gate.e_score_correction_bias"]
    sd["model.layers.1.self_attn.q_a_proj.weight_scale_inv"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"missing \['model.layers.2.mlp.gate.e_score_correction_bias'\], "
                                         r"unexpected \['model.layers.1.self_attn.q_a_proj.weight_scale_inv'\]"):
        hf_to_params(sd, cfg)
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 12)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.kv_b_proj.weight has shape \(3, 12\)"):
        hf_to_params(sd, cfg)


@pytest.mark.parametrize("case", ["q_lora_groups_yarn_mscale", "bias_rotate_half_tied"])
def test_deepseek_v3_load_and_save_pretrained_round_trip_hf(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    model, params = hf_io.load_pretrained(str(tmp_path / "hf"))
    ids = _ids(seed=3)
    theirs = _hf_logits(hf, ids)
    np.testing.assert_allclose(_our_logits(model.config, params, ids), theirs, rtol=1e-4,
                               atol=1e-4 * np.max(np.abs(theirs)))
    hf_io.save_pretrained(model, params, str(tmp_path / "ours"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours",
                                                                 attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    want = hf.state_dict()
    assert reloaded.state_dict().keys() == want.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    # Equal weights, but not bit-equal logits: from_pretrained leaves tensors at unaligned
    # offsets of the file's memory map, which changes torch's CPU kernels' rounding (~1e-7).
    np.testing.assert_allclose(_hf_logits(reloaded, ids), theirs, rtol=1e-6, atol=1e-6 * np.max(np.abs(theirs)))
    again, params_again = hf_io.load_pretrained(str(tmp_path / "ours"))
    assert again.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_again, params)


# --- routing: group-limited, bias-corrected -------------------------------------------------

def _np_group_route(logits, bias, cfg):
    """float64 DeepSeek-V3 routing: (weights, experts, eligible [G, E])."""
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    choice = scores + bias
    G, E = choice.shape
    M, J = cfg.n_group, E // cfg.n_group
    group_scores = np.sort(choice.reshape(G, M, J), -1)[..., -2:].sum(-1)
    groups = np.argsort(-group_scores, -1, kind="stable")[:, :cfg.topk_group]
    eligible = np.zeros((G, M), bool)
    np.put_along_axis(eligible, groups, True, -1)
    eligible = np.repeat(eligible, J, -1)
    experts = np.argsort(-np.where(eligible, choice, -np.inf), -1, kind="stable")[:, :cfg.num_experts_per_tok]
    weights = np.take_along_axis(scores, experts, -1)
    if cfg.norm_topk_prob:
        weights /= weights.sum(-1, keepdims=True)
    return weights * cfg.routed_scaling_factor, experts, eligible


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_group_limited_routing_matches_numpy_and_stays_in_top_groups_hf(norm_topk_prob):
    cfg = MoEConfig(num_experts=16, num_experts_per_tok=3, expert_d_ff=4, score_func="sigmoid",
                    norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5, n_group=4, topk_group=2,
                    score_correction_bias=True)
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(64, 16)) * 2).astype(np.float32)
    bias = (rng.normal(size=16) * 0.3).astype(np.float32)
    weights, experts = (np.asarray(a) for a in route(jnp.asarray(logits), cfg, jnp.asarray(bias)))
    want_w, want_e, eligible = _np_group_route(logits, bias.astype(np.float64), cfg)
    np.testing.assert_array_equal(experts, want_e)
    np.testing.assert_allclose(weights, want_w, rtol=1e-6)
    assert np.take_along_axis(eligible, experts, -1).all()
    # The cases must exercise the limits: unconstrained top-k leaves the kept groups, and
    # without the bias other experts win.
    unlimited = np.argsort(-(1 / (1 + np.exp(-logits)) + bias), -1)[:, :3]
    assert not np.take_along_axis(eligible, unlimited, -1).all()
    assert (np.sort(_np_group_route(logits, 0.0, cfg)[1]) != np.sort(want_e)).any()
    # Weights come from the uncorrected scores.
    sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
    raw = np.take_along_axis(sigmoid, experts, -1)
    np.testing.assert_allclose(weights / 2.5, raw / raw.sum(-1, keepdims=True) if norm_topk_prob else raw, rtol=1e-6)


def test_sequence_wise_balance_loss_matches_numpy_hf():
    B, T, E, K = 2, 6, 8, 2
    cfg = MoEConfig(num_experts=E, num_experts_per_tok=K, expert_d_ff=4, score_func="sigmoid", n_group=2,
                    topk_group=1, score_correction_bias=True, seq_aux_loss_weight=0.01)
    x = np.random.default_rng(1).normal(size=(B, T, 16)).astype(np.float32)
    init = jax.jit(MoEFeedForward(cfg).init, compiler_options=FAST_COMPILE)
    params = nn.unbox(init(jax.random.key(0), jnp.asarray(x))["params"])
    params["score_correction_bias"] = jnp.asarray(np.linspace(-0.2, 0.2, E), jnp.float32)
    _, stats = jax.jit(MoEFeedForward(cfg).apply, compiler_options=FAST_COMPILE)({"params": params}, jnp.asarray(x))
    logits = x.reshape(-1, 16).astype(np.float64) @ np.asarray(params["router"], np.float64)
    _, experts, _ = _np_group_route(logits, np.linspace(-0.2, 0.2, E), cfg)
    scores = 1 / (1 + np.exp(-logits))
    normalised = (scores / scores.sum(-1, keepdims=True)).reshape(B, T, E)
    counts = np.stack([np.bincount(e.ravel(), minlength=E) for e in experts.reshape(B, T * K)])
    want = np.mean(np.sum(E / (K * T) * counts * normalised.mean(1), -1))
    np.testing.assert_allclose(stats["seq_aux_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(stats["weighted_loss"], 0.01 * want, rtol=1e-5)


def test_bad_group_routing_configs_are_refused_hf():
    with pytest.raises(ValueError, match="n_group"):
        MoEConfig(num_experts=8, num_experts_per_tok=2, expert_d_ff=4, n_group=3)
    with pytest.raises(ValueError, match="n_group"):
        MoEConfig(num_experts=8, num_experts_per_tok=2, expert_d_ff=4, n_group=8)  # groups of 1
    with pytest.raises(ValueError, match="topk_group"):
        MoEConfig(num_experts=8, num_experts_per_tok=2, expert_d_ff=4, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEConfig(num_experts=8, num_experts_per_tok=3, expert_d_ff=4, n_group=4, topk_group=1)


# --- auxiliary-loss-free balancing ------------------------------------------------------------

def test_update_correction_bias_steps_each_expert_by_rate_hf():
    loads = np.array([10.0, 2.0, 6.0, 6.0])  # mean 6: over, under, exactly average twice
    step = np.array([-1.0, 1.0, 0.0, 0.0]) * 1e-3
    bias = np.array([0.5, -0.5, 0.25, 0.0], np.float32)
    other = jnp.ones((3,))
    params = {"layer_1": {"mlp": {"score_correction_bias": jnp.asarray(bias), "router": other}}}
    stats = {"layer_1": {"mlp": {"router_stats": ({"tokens_per_expert": jnp.asarray(loads)},)}}}
    new = update_correction_bias(params, stats, 1e-3)
    np.testing.assert_allclose(new["layer_1"]["mlp"]["score_correction_bias"], bias + step, rtol=0, atol=1e-7)
    assert new["layer_1"]["mlp"]["router"] is other
    # Stacked by nn.scan: [L, E] biases and loads; boxed and FrozenDict params.
    stacked = FrozenDict({"layers": {"mlp": {"score_correction_bias": nn.LogicallyPartitioned(
        jnp.zeros((2, 4)), ("layers", "expert"))}}})
    stats = {"layers": {"mlp": {"router_stats": ({"tokens_per_expert": jnp.asarray([loads, loads[::-1]])},)}}}
    new = update_correction_bias(stacked, stats, 0.5)
    box = new["layers"]["mlp"]["score_correction_bias"]
    assert isinstance(box, nn.LogicallyPartitioned) and box.names == ("layers", "expert")
    np.testing.assert_array_equal(box.value, 0.5 * np.stack([np.sign(6 - loads), np.sign(6 - loads[::-1])]))
    with pytest.raises(ValueError, match="layer_1/mlp/score_correction_bias"):
        update_correction_bias(params, {}, 1e-3)


def test_correction_bias_gets_no_gradient_hf():
    cfg = MoEConfig(num_experts=8, num_experts_per_tok=2, expert_d_ff=4, score_func="sigmoid", n_group=4,
                    topk_group=2, score_correction_bias=True, seq_aux_loss_weight=0.1, aux_loss_weight=0.1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 16)), jnp.float32)
    params = nn.unbox(jax.jit(MoEFeedForward(cfg).init, compiler_options=FAST_COMPILE)(jax.random.key(0), x)["params"])
    params["score_correction_bias"] = jnp.linspace(-0.1, 0.1, 8)

    def loss(p):
        y, stats = MoEFeedForward(cfg).apply({"params": p}, x)
        return jnp.sum(y ** 2) + stats["weighted_loss"]

    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)
    assert grads["score_correction_bias"].dtype == jnp.float32
    assert not np.any(grads["score_correction_bias"]) and np.any(grads["router"])


def test_update_correction_bias_on_gpt_intermediates_scanned_or_not_hf():
    cfg = deepseek_v3_config(vocab_size=VOCAB, d_model=D, num_layers=3, num_heads=4, d_ff=40, moe_d_ff=12,
                             num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_dense_layers=1,
                             q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                             max_len=64, seq_aux_loss_weight=1e-2)
    ids = jnp.asarray(_ids(), jnp.int32)
    params = nn.unbox(jax.jit(GPT(cfg).init, compiler_options=FAST_COMPILE)(jax.random.key(0), ids)["params"])

    @functools.partial(jax.jit, static_argnums=1, compiler_options=FAST_COMPILE)
    def intermediates_of(p, config):
        return GPT(config).apply({"params": p}, ids, mutable=["intermediates"])[1]["intermediates"]

    intermediates = intermediates_of(params, cfg)
    new = update_correction_bias(params, intermediates, 1e-3)
    for i in _moe_layers(cfg):
        load = np.asarray(intermediates[f"layer_{i}"]["mlp"]["router_stats"][0]["tokens_per_expert"])
        assert load.sum() == ids.size * 2 and load.std() > 0
        np.testing.assert_allclose(new[f"layer_{i}"]["mlp"]["score_correction_bias"],
                                   1e-3 * np.sign(load.mean() - load), rtol=0, atol=1e-9)
    assert new["layer_0"] is params["layer_0"]  # the dense layer is untouched

    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    scan_intermediates = intermediates_of(scan_params(params, cfg), scan_cfg)
    np.testing.assert_allclose(total_aux_loss(scan_intermediates), total_aux_loss(intermediates), rtol=1e-5)
    scanned = unscan_params(update_correction_bias(scan_params(params, cfg), scan_intermediates, 1e-3), cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, scanned, new)
