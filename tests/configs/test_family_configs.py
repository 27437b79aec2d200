"""The family presets (configs/{gpt,llama,qwen,bert,moe,deepseek}.py) load, build the intended
model and train.

Every preset is built shape-only (jax.eval_shape), and the full-size ones' parameter counts
are checked against the published ones (Hugging Face's `model.parameters()`, or the
checkpoint's tensors): GPT-2 124,439,808; Llama-3-8B 8,030,261,248; Qwen3-8B hidden 4096,
intermediate 12288, 36 layers, 32 / 8 heads of dim 128, vocab 151936, untied:
8,190,735,360; Mixtral-8x7B 46,702,792,704; Qwen3-30B-A3B 30,532,122,624; BERT-base
BertModel 109,482,240 (BertForMaskedLM, counted by transformers on the meta device);
DeepSeek-V3 671,026,419,200 without its multi-token-prediction module.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, bert, deepseek, gpt, llama, moe, qwen
from configs.loader import load_config
from models.bert import BertForMaskedLM
from train import build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = {"gpt": gpt, "llama": llama, "qwen": qwen, "bert": bert, "moe": moe, "deepseek": deepseek}
TINY = [f"configs/{name}.py:tiny" for name in FILES]
ALL_PRESETS = [f"configs/{name}.py:{p}" for name, m in FILES.items() for p in m.PRESETS]


def _keys(c, prefix=""):
    out = set()
    for k, v in c.items():
        out |= _keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
    return out


def _params(model, seq_len=8):
    """Parameter shapes of `model`, without allocating them."""
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))
    return nn.meta.unbox(jax.eval_shape(init)["params"])


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))




@pytest.mark.parametrize("spec", ALL_PRESETS)
def test_every_preset_loads_with_exactly_the_base_keys(spec):
    config = load_config(os.path.join(REPO, spec))
    assert _keys(config) == _keys(base.get_config())


def test_gpt_tiny_keeps_gpt2_switches():
    cfg = build.model(load_config(os.path.join(REPO, "configs/gpt.py:tiny")), 512).config
    b = cfg.block
    assert cfg.positional == "learned" and b.rope is None and cfg.tie_embeddings
    assert (b.norm, b.mlp_activation, b.kv_heads, b.qk_norm, b.sliding_window) == ("layernorm", "gelu_tanh", 4, False, None)
    assert b.has_qkv_bias and b.has_out_bias and b.has_mlp_bias
    params = _params(build.model(load_config(os.path.join(REPO, "configs/gpt.py:tiny")), 512))
    assert "positions" in params and "lm_head" not in params


def test_llama_tiny_has_llama_switches():
    cfg = build.model(load_config(os.path.join(REPO, "configs/llama.py:tiny")), 512).config
    b = cfg.block
    assert cfg.positional == "rope" and b.rope.theta == 500000.0 and not b.rope.interleaved
    assert (b.norm, b.mlp_activation, b.num_heads, b.kv_heads, b.qk_norm) == ("rmsnorm", "swiglu", 4, 2, False)
    assert not (b.has_qkv_bias or b.has_out_bias or b.has_mlp_bias) and not cfg.tie_embeddings
    params = _params(build.model(load_config(os.path.join(REPO, "configs/llama.py:tiny")), 512))
    attn = params["layer_0"]["self_attention"]
    assert attn["key"].shape == (64, 2, 16) and attn["query"].shape == (64, 4, 16)  # GQA: K=2 of N=4
    assert "positions" not in params and "lm_head" in params and "wi_gate" in params["layer_0"]["mlp"]
    assert "query_norm" not in attn and "bias" not in params["final_norm"]


def test_qwen_tiny_has_qwen3_switches():
    cfg = build.model(load_config(os.path.join(REPO, "configs/qwen.py:tiny")), 512).config
    b = cfg.block
    assert cfg.positional == "rope" and b.rope.theta == 1e6 and b.norm_eps == 1e-6
    assert (b.norm, b.mlp_activation, b.kv_heads, b.head_size, b.qk_norm) == ("rmsnorm", "swiglu", 2, 32, True)
    params = _params(build.model(load_config(os.path.join(REPO, "configs/qwen.py:tiny")), 512))
    attn = params["layer_0"]["self_attention"]
    assert attn["query"].shape == (64, 4, 32) and attn["key"].shape == (64, 2, 32)  # head_dim 32, not 64 / 4
    assert attn["query_norm"].shape == attn["key_norm"].shape == (32,)
    assert "positions" not in params and "lm_head" not in params  # tied, as Qwen3-0.6B


def test_bert_tiny_is_a_post_ln_masked_lm():
    model = build.model(load_config(os.path.join(REPO, "configs/bert.py:tiny")), 512)
    b = model.config.block
    assert isinstance(model, BertForMaskedLM) and model.config.type_vocab_size == 2
    assert (b.norm, b.norm_position, b.mlp_activation, b.norm_eps) == ("layernorm", "post", "gelu", 1e-12)
    assert b.rope is None
    params = _params(model)
    assert set(params) == {"bert", "transform", "transform_norm", "output_bias"}  # no pooler
    assert params["bert"]["position_embeddings"]["embedding"].shape == (64, 64)


def test_moe_tiny_is_a_mixtral_style_mixture():
    cfg = build.model(load_config(os.path.join(REPO, "configs/moe.py:tiny")), 512).config
    m = cfg.block.moe
    assert (m.num_experts, m.num_experts_per_tok, m.expert_d_ff, m.score_func, m.aux_loss_weight) == (
        4, 2, 128, "softmax", 0.01)
    assert cfg.block.rope is not None and cfg.block.norm == "rmsnorm" and cfg.first_dense_layers == 0
    mlp = _params(build.model(load_config(os.path.join(REPO, "configs/moe.py:tiny")), 512))["layer_1"]["mlp"]
    assert mlp["router"].shape == (64, 4) and mlp["wi_gate"].shape == (4, 64, 128) and "shared" not in mlp


@pytest.mark.parametrize("key, default, other, bad", [
    ("dropless_impl", "sparse", "dense", "ragged"),
    ("grouped_matmul", "auto", "tiled", "megablocks"),
    ("dispatch", "auto", "all_to_all", "alltoall"),
])
def test_moe_execution_keys_reach_the_model(key, default, other, bad):
    spec = os.path.join(REPO, "configs/moe.py:tiny")
    assert getattr(build.model(load_config(spec), 512).config.block.moe, key) == default
    assert getattr(build.model(load_config(spec, [f"model.moe.{key}={other}"]), 512).config.block.moe, key) == other
    with pytest.raises(ValueError, match=key):
        build.model(load_config(spec, [f"model.moe.{key}={bad}"]), 512)


def test_deepseek_tiny_has_mla_a_dense_first_layer_grouped_moe_and_mtp():
    model = build.model(load_config(os.path.join(REPO, "configs/deepseek.py:tiny")), 512)
    cfg, params = model.config, _params(model)
    m = cfg.block.moe
    assert (m.score_func, m.n_group, m.topk_group, m.score_correction_bias, m.num_shared_experts) == (
        "sigmoid", 4, 2, True, 1)
    assert (cfg.block.mla.kv_lora_rank, cfg.block.mla.q_lora_rank, cfg.mtp_depth, cfg.first_dense_layers) == (
        32, 32, 1, 1)
    assert "router" not in params["layer_0"]["mlp"] and params["layer_0"]["mlp"]["wi_gate"].shape == (64, 128)
    assert params["layer_1"]["mlp"]["score_correction_bias"].shape == (8,) and "shared" in params["layer_1"]["mlp"]
    assert {"query_down", "key_up", "value_up", "latent_kv"} <= set(params["layer_0"]["self_attention"])
    assert "mtp_1" in params


@pytest.mark.parametrize("spec", TINY)
def test_tiny_num_params_counts_the_initialised_params(spec):
    model = build.model(load_config(os.path.join(REPO, spec)), 512)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert build.model_size(model, 64)[0] == _count(params)


@pytest.mark.parametrize("spec", ALL_PRESETS)
def test_every_preset_builds_and_its_count_is_its_shapes(spec):
    """Shape-only (no memory): the parameters the trainer reports are the ones init makes."""
    config = load_config(os.path.join(REPO, spec))
    model = build.model(config, config.model.vocab_size or config.tokenizer.vocab_size)
    params = _params(model)
    assert build.model_size(model, config.data.seq_len)[0] == _count(params)


@pytest.mark.parametrize("spec,expected", [
    ("configs/gpt.py:gpt2_124m", 124_439_808),
    ("configs/llama.py:llama3_8b", 8_030_261_248),
    ("configs/qwen.py:qwen3_8b", 8_190_735_360),
    ("configs/moe.py:mixtral_8x7b", 46_702_792_704),
    ("configs/moe.py:qwen3_30b_a3b", 30_532_122_624),
])
def test_full_size_presets_match_hugging_face_counts(spec, expected):
    config = load_config(os.path.join(REPO, spec))
    model = build.model(config, config.model.vocab_size)
    assert _count(_params(model)) == expected == model.config.num_params()


def test_bert_base_matches_transformers_bert_counts():
    import torch
    import transformers

    config = load_config(os.path.join(REPO, "configs/bert.py:bert_base"))
    model = build.model(config, config.model.vocab_size)
    with torch.device("meta"):  # shapes only
        hf = transformers.BertForMaskedLM(transformers.BertConfig())  # bert-base-uncased's sizes
    hf_count = sum(p.numel() for p in hf.parameters())  # the tied decoder once
    assert model.config.num_params("base") == 109_482_240  # BertModel, with its pooler
    assert _count(_params(model)) == model.config.num_params("mlm") == hf_count == 109_514_298


def test_deepseek_v3_counts_671b_without_and_682b_with_multi_token_prediction():
    """671,026,419,200 is the checkpoint's main model: HF's parameters() (671,026,404,352)
    plus the 58 MoE layers' correction biases [256] (buffers in HF, stored values here). Our
    MTP module (norms, the [2D, D] projection and an MoE layer; embedding and head shared)
    adds 11,610,068,224; HF's checkpoint stores its own copies of the embedding and head
    (2 x 926,679,040), hence its ~684.5B."""
    config = load_config(os.path.join(REPO, "configs/deepseek.py:deepseek_v3_671b"))
    cfg = build.model(config, config.model.vocab_size).config
    params = _params(build.model(config, config.model.vocab_size))
    main = {k: v for k, v in params.items() if not k.startswith("mtp_")}
    assert _count(main) == 671_026_419_200 == cfg.num_params(include_mtp=False)
    assert _count(params["mtp_1"]) == 11_610_068_224 == cfg.mtp_params()
    assert _count(params) == cfg.num_params() == 682_636_487_424
    assert _count(params) + 2 * 129280 * 7168 == 684_489_845_504  # HF's checkpoint, MTP copies included


def test_rope_scaling_keys_reach_the_model():
    config = load_config(os.path.join(REPO, "configs/llama.py:tiny"), [
        "model.rope_scaling=llama3", "model.rope_factor=8", "model.rope_original_max_len=32",
        "model.block.sliding_window=16", "model.block.qkv_bias=TRUE"])
    b = build.model(config, 512).config.block
    assert (b.rope.scaling, b.rope.factor, b.rope.original_max_len) == ("llama3", 8.0, 32)
    assert b.sliding_window == 16 and b.has_qkv_bias and not b.has_out_bias
    # 0: the pre-training context is model.max_len.
    config = load_config(os.path.join(REPO, "configs/llama.py:tiny"), ["model.rope_scaling=dynamic", "model.rope_factor=2"])
    assert build.model(config, 512).config.block.rope.original_max_len == 64


@pytest.mark.parametrize("spec,override,message", [
    ("gpt", "model.block.qkv_bias=yes", r"config key `model.block.qkv_bias`='yes'; expected one of \('auto'"),
    ("gpt", "model.rope_theta=5e5", r"config key `model.rope_theta` is set but model.positional='learned'"),
    ("gpt", "model.positional=alibi", r"config key `model.positional`='alibi'; expected one of"),
    ("llama", "model.rope_scaling=ntk", r"config key `model.rope_scaling`='ntk'; expected one of"),
    ("llama", "model.block.sliding_window=-1", r"config key `model.block.sliding_window`=-1"),
    ("qwen", "model.family=t5", r"config key `model.family`='t5'"),
    ("bert", "model.remat=full", r"config key `model.remat` is set but model.family='bert'"),
    ("bert", "model.positional=rope", r"model.family='bert' has learned positions"),
    ("gpt", "model.type_vocab_size=3", r"config key `model.type_vocab_size` is set but model.family='gpt'"),
    ("moe", "model.moe.num_experts=0", r"model.family='moe' needs experts"),
    ("moe", "model.moe.bias_update_rate=0.1", r"`model.moe.bias_update_rate`=0.1 needs"),
    ("llama", "model.mla.q_lora_rank=8", r"config key `model.mla.q_lora_rank` is set but model.mla.kv_lora_rank=0"),
    ("llama", "model.moe.n_group=2", r"config key `model.moe.n_group` is set but model.moe.num_experts=0"),
])
def test_bad_model_values_name_the_key(spec, override, message):
    config = load_config(os.path.join(REPO, f"configs/{spec}.py:tiny"), [override])
    with pytest.raises(ValueError, match=message):
        build.model(config, 512)
