"""Mixtral / Qwen3-MoE as GPT configs (block.moe) against Hugging Face transformers on torch.

Small random HF models are built here (no download); their weights go through
models/convert/moe.py into our GPT, and back.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import hf as hf_io
from models.convert.moe import config_from_hf, hf_to_params, params_to_hf
from models.gpt import GPT
from tests.torch_reference import assert_same_logits, assert_same_state_dict

VOCAB, D, LAYERS = 61, 32, 2
COMMON = {"vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": LAYERS, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-5, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2}
CASES = {
    "mixtral": (transformers.MixtralConfig, {"intermediate_size": 24, "num_local_experts": 4}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {"intermediate_size": 40, "moe_intermediate_size": 24,
                                                "num_experts": 4, "head_dim": 16, "norm_topk_prob": False}),
    "qwen3_moe_norm_topk_tied": (transformers.Qwen3MoeConfig, {
        "intermediate_size": 40, "moe_intermediate_size": 16, "num_experts": 4, "norm_topk_prob": True,
        "tie_word_embeddings": True}),
}
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _ids(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


@functools.cache
def _hf_model(case: str):
    cls, overrides = CASES[case]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**COMMON, **overrides),
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _our_logits(cfg, params, ids):
    model = GPT(cfg)
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=FAST_COMPILE)(
        params, jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("case", CASES)
def test_moe_logits_match_hf_torch(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.block.moe is not None and cfg.block.moe.capacity_factor == 0
    params = hf_to_params(hf.state_dict(), cfg)
    ids = _ids()
    ours, theirs = _our_logits(cfg, params, ids), _hf_logits(hf, ids)
    err = np.max(np.abs(ours - theirs))
    print(f"\n{case} vs transformers: max |diff| = {err:.3g}, relative {err / np.max(np.abs(theirs)):.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.max(np.abs(theirs)))


@pytest.mark.parametrize("case", CASES)
def test_moe_num_params_equals_hf_torch_count(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
    params = hf_to_params(hf.state_dict(), cfg)
    assert cfg.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_moe_round_trip_through_hf_torch_state_dict(case):
    hf = _hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    sd = params_to_hf(hf_to_params(hf.state_dict(), cfg), cfg)
    fresh = transformers.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager").eval()
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    ids = _ids(seed=1)
    assert_same_state_dict(fresh, hf)
    assert_same_logits(_hf_logits(fresh, ids), _hf_logits(hf, ids))


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_moe_reads_per_expert_checkpoint_written_by_hf_torch(case, tmp_path):
    """transformers' save_pretrained writes one tensor per expert; both layouts load."""
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    cfg = config_from_hf(hf.config.to_dict())
    tensors = hf_io.read_safetensors(str(tmp_path))
    assert not any("gate_up_proj" in name for name in tensors)
    fused = hf_to_params(hf.state_dict(), cfg)
    per_expert = hf_to_params(tensors, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, per_expert, fused)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe_norm_topk_tied"])
def test_moe_load_and_save_pretrained_round_trip_hf_torch(case, tmp_path):
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
    assert_same_state_dict(reloaded, hf)
    assert_same_logits(_hf_logits(reloaded, ids), theirs)


def test_mixtral_gradients_match_hf_torch_autograd():
    hf = _hf_model("mixtral")
    cfg = config_from_hf(hf.config.to_dict())
    params = hf_to_params(hf.state_dict(), cfg)
    ids = _ids(length=13, seed=2)
    hf.zero_grad()
    logits = hf(torch.tensor(ids[:, :-1], dtype=torch.long)).logits
    torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                   torch.tensor(ids[:, 1:], dtype=torch.long).reshape(-1))
    torch_loss.backward()
    torch_grads = hf_to_params({name: p.grad for name, p in hf.named_parameters()}, cfg)
    model = GPT(cfg)

    def loss_fn(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, jnp.asarray(ids[:, :-1])))
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:, None]), axis=-1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn), compiler_options=FAST_COMPILE)(params)
    np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)
    worst = 0.0
    for path in [("layer_0", "mlp", "router"), ("layer_0", "mlp", "wi_gate"), ("layer_1", "mlp", "wo"),
                 ("layer_1", "mlp", "wi_up"), ("layer_0", "self_attention", "query"), ("embed", "embedding")]:
        ours, want = grads, torch_grads
        for key in path:
            ours, want = ours[key], want[key]
        ours, want = np.asarray(ours), np.asarray(want)
        scale = np.max(np.abs(want))
        assert scale > 0, path
        worst = max(worst, float(np.max(np.abs(ours - want)) / scale))
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * scale, err_msg="/".join(path))
    print(f"\nMixtral grads vs torch autograd: max |diff| / max |grad| = {worst:.3g}")


def test_qwen3_moe_dense_layers_are_refused():
    cfg = _hf_model("qwen3_moe").config.to_dict()
    with pytest.raises(ValueError, match="mlp_only_layers"):
        config_from_hf({**cfg, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        config_from_hf({**cfg, "decoder_sparse_step": 2})
