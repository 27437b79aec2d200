"""LLaMA / Qwen2 / Qwen3 as GPT configs against Hugging Face transformers on torch.

Small random HF models are built here (no download); their weights go through
models/convert/llama.py into our GPT, and back.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models.convert.llama import config_from_hf, hf_to_params, params_to_hf
from models.gpt import GPT
from tests.torch_reference import assert_same_logits, assert_same_state_dict

VOCAB, D, LAYERS, FF = 61, 32, 2, 48
COMMON = {"vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": LAYERS, "intermediate_size": FF,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "attn_implementation": "eager"}
GQA = {"num_attention_heads": 4, "num_key_value_heads": 2}
CASES = {
    "llama_gqa_untied": (transformers.LlamaConfig, {**GQA, "tie_word_embeddings": False}),
    "llama_mqa_tied": (transformers.LlamaConfig, {"num_attention_heads": 4, "num_key_value_heads": 1,
                                                  "tie_word_embeddings": True,
                                                  "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    "llama_biases": (transformers.LlamaConfig, {**GQA, "attention_bias": True, "mlp_bias": True}),
    "qwen2_qkv_bias_tied": (transformers.Qwen2Config, {**GQA, "tie_word_embeddings": True}),
    "qwen2_sliding": (transformers.Qwen2Config, {**GQA, "use_sliding_window": True, "sliding_window": 4,
                                                 "max_window_layers": 0}),
    "qwen3_qk_norm_head_dim": (transformers.Qwen3Config, {**GQA, "head_dim": 16, "tie_word_embeddings": False}),
    "llama3_rope_scaling": (transformers.LlamaConfig, {**GQA, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "qwen3_yarn": (transformers.Qwen3Config, {**GQA, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}}),
}
# LLVM -O0 compiles faster on CPU; the forward is tiny either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _ids(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


@functools.cache
def _hf_model(case: str):
    """A random HF model whose norms and biases are far from their 1 / 0 initial values."""
    cls, overrides = CASES[case]
    torch.manual_seed(0)
    hf_config = cls(**COMMON, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _our_logits(cfg, params, ids):
    model = GPT(cfg)
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=FAST_COMPILE)(
        params, jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf_torch(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    params = hf_to_params(hf.state_dict(), cfg)
    ids = _ids()
    ours, theirs = _our_logits(cfg, params, ids), _hf_logits(hf, ids)
    err = np.max(np.abs(ours - theirs))
    print(f"\n{case} vs transformers: max |diff| = {err:.3g}, relative to max |logit| "
          f"{err / np.max(np.abs(theirs)):.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.max(np.abs(theirs)))


@pytest.mark.parametrize("case", CASES)
def test_num_params_equals_hf_torch_count(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())  # parameters() counts tied ones once
    params = hf_to_params(hf.state_dict(), cfg)
    assert cfg.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen2_qkv_bias_tied", "qwen3_qk_norm_head_dim"])
def test_round_trip_through_hf_torch_state_dict(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    sd = params_to_hf(hf_to_params(hf.state_dict(), cfg), cfg)
    fresh = transformers.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager").eval()
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    ids = _ids(seed=1)
    assert_same_state_dict(fresh, hf)
    assert_same_logits(_hf_logits(fresh, ids), _hf_logits(hf, ids))


def test_llama_gradients_match_hf_torch_autograd():
    hf = _hf_model("llama_gqa_untied")
    cfg = config_from_hf(hf.config.to_dict())
    params = hf_to_params(hf.state_dict(), cfg)
    ids = _ids(length=13, seed=2)

    hf.zero_grad()
    logits = hf(torch.tensor(ids[:, :-1], dtype=torch.long)).logits
    torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                   torch.tensor(ids[:, 1:], dtype=torch.long).reshape(-1))
    torch_loss.backward()
    # Gradients have their weights' layouts, so the same converter maps them.
    torch_grads = hf_to_params({name: p.grad for name, p in hf.named_parameters()}, cfg)

    model = GPT(cfg)

    def loss_fn(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, jnp.asarray(ids[:, :-1])))
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:, None]), axis=-1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn), compiler_options=FAST_COMPILE)(params)
    np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)
    flat_ours = dict(jax.tree_util.tree_leaves_with_path(grads))
    flat_torch = dict(jax.tree_util.tree_leaves_with_path(torch_grads))
    assert flat_ours.keys() == flat_torch.keys()
    worst = 0.0
    for path, g in flat_ours.items():
        want = np.asarray(flat_torch[path])
        scale = np.max(np.abs(want))
        assert scale > 0, jax.tree_util.keystr(path)
        worst = max(worst, float(np.max(np.abs(np.asarray(g) - want)) / scale))
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))
    print(f"\nLLaMA grads vs torch autograd: max |diff| / max |grad| over {len(flat_ours)} tensors = {worst:.3g}")


def test_missing_and_unexpected_tensors_are_named():
    hf = _hf_model("qwen3_qk_norm_head_dim")
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    del sd["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.self_attn.k_norm.weight'\]"):
        hf_to_params(sd, cfg)
    sd = dict(hf.state_dict(), **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"):
        hf_to_params(sd, cfg)


def test_config_from_hf_reads_each_family():
    llama = config_from_hf(_hf_model("llama_mqa_tied").config.to_dict())
    assert llama.block.rope.theta == 500000.0 and llama.block.kv_heads == 1 and llama.tie_embeddings
    assert not llama.block.has_qkv_bias and not llama.block.qk_norm and llama.positional == "rope"
    qwen2 = config_from_hf(_hf_model("qwen2_sliding").config.to_dict())
    assert qwen2.block.has_qkv_bias and not qwen2.block.has_out_bias and qwen2.block.sliding_window == 4
    qwen3 = config_from_hf(_hf_model("qwen3_qk_norm_head_dim").config.to_dict())
    assert qwen3.block.qk_norm and qwen3.block.head_size == 16 and not qwen3.tie_embeddings
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


FULL_SIZE = {
    "llama3_8b": (transformers.LlamaConfig, {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    "qwen3_0.6b": (transformers.Qwen3Config, {
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", FULL_SIZE)
def test_full_size_shapes_match_hf_torch_on_meta_device(case):
    cls, kwargs = FULL_SIZE[case]
    with torch.device("meta"):  # shapes only, no memory
        hf = transformers.AutoModelForCausalLM.from_config(cls(**kwargs))
    cfg = config_from_hf(hf.config.to_dict())
    shapes = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
    counted = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes["params"]))
    hf_count = sum(p.numel() for p in hf.parameters())
    print(f"\n{case}: {hf_count / 1e9:.3f}B parameters")
    assert cfg.num_params() == counted == hf_count
