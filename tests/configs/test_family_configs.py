"""The family presets (configs/{gpt,llama,qwen}.py) load, build the intended model and train.

Full-size presets are built shape-only (jax.eval_shape) and their parameter counts checked
against Hugging Face's (transformers on the meta device: Llama-3-8B 8,030,261,248; Qwen3-8B
hidden 4096, intermediate 12288, 36 layers, 32 / 8 heads of dim 128, vocab 151936,
untied: 8,190,735,360).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, gpt, llama, qwen
from configs.loader import load_config
from train import build, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = {"gpt": gpt, "llama": llama, "qwen": qwen}
TINY = [f"configs/{name}.py:tiny" for name in FILES]


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


@pytest.mark.parametrize("spec", [f"configs/{name}.py:{p}" for name, m in FILES.items() for p in m.PRESETS])
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


@pytest.mark.parametrize("spec", TINY)
def test_tiny_num_params_counts_the_initialised_params(spec):
    model = build.model(load_config(os.path.join(REPO, spec)), 512)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert model.config.num_params() == _count(params)


@pytest.mark.parametrize("spec,expected", [
    ("configs/llama.py:llama3_8b", 8_030_261_248),
    ("configs/qwen.py:qwen3_8b", 8_190_735_360),
])
def test_full_size_presets_match_hugging_face_counts(spec, expected):
    config = load_config(os.path.join(REPO, spec))
    model = build.model(config, config.model.vocab_size)
    assert _count(_params(model)) == expected == model.config.num_params()


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
    ("qwen", "model.family=bert", r"config key `model.family`='bert'"),
])
def test_bad_model_values_name_the_key(spec, override, message):
    config = load_config(os.path.join(REPO, f"configs/{spec}.py:tiny"), [override])
    with pytest.raises(ValueError, match=message):
        build.model(config, 512)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A data_dir and a trained tokenizer shared by the runs of this module."""
    root = tmp_path_factory.mktemp("shared")
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [f"data.data_dir={root / 'tfds'}"])
    build.tokenizer(config, str(root), build.data_config(config, str(root)))
    return [f"data.data_dir={root / 'tfds'}", f"tokenizer.path={root / 'tokenizer'}"]


@pytest.mark.parametrize("spec", TINY)
def test_tiny_preset_learns(shared, spec, tmp_path):
    config = load_config(os.path.join(REPO, spec), [*shared, "steps=20", "logging.progress_bar=false",
                                                    "logging.peak_flops=1e11"])
    trainer.run(config, str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
