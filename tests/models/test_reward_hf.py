"""Reward models (a decoder under a `score` head) against transformers'
LlamaForSequenceClassification / Qwen2ForSequenceClassification on torch, both directions:
random weights, right-padded batches with pad_token_id set, the score of each row at its last
non-padding token (ours: `len - 1`; transformers: the rightmost token that is not the pad id)."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import hf, hf_verify
from models.gpt import GPT, llama_config, qwen2_config
from train.objectives.reward import sequence_scores

VOCAB, D, LAYERS, FF, PAD = 61, 32, 2, 48, 3
EPS32 = float(np.finfo(np.float32).eps)
COMMON = {"vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": LAYERS, "intermediate_size": FF,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
          "num_labels": 1, "pad_token_id": PAD}
ARCHS = {"LlamaForSequenceClassification": transformers.LlamaConfig,
         "Qwen2ForSequenceClassification": transformers.Qwen2Config}
LENGTHS = np.array([12, 7, 1, 4])


def _tolerance(reference: np.ndarray) -> float:
    """float32 rounding of L pre-norm layers whose dot products are at most FF long: a few eps
    per reduction growing as sqrt(FF), accumulating over the layers (+1: embeddings and head),
    relative to the largest score."""
    return 16 * EPS32 * np.sqrt(FF) * (LAYERS + 1) * float(np.max(np.abs(reference)))


def _padded_ids(seed: int = 0) -> np.ndarray:
    """[4, 12] right-padded with PAD; the real tokens avoid PAD (transformers finds the end by it)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB - 1, size=(len(LENGTHS), 12))
    ids = np.where(ids >= PAD, ids + 1, ids)
    ids[np.arange(12)[None, :] >= LENGTHS[:, None]] = PAD
    return ids


def _hf_scores(model, ids: np.ndarray) -> np.ndarray:
    mask = (np.arange(ids.shape[1])[None, :] < LENGTHS[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    return out.double().numpy()[:, 0]


def _our_scores(model, params, ids: np.ndarray) -> np.ndarray:
    fn = jax.jit(lambda p, x, n: sequence_scores(model, p, x, n))
    return np.asarray(fn(params, jnp.asarray(ids, jnp.int32), jnp.asarray(LENGTHS, jnp.int32)), np.float64)


def _hf_model(arch: str):
    """A random transformers reward model, norms and biases away from 1 / 0 and a head that matters."""
    torch.manual_seed(0)
    model = getattr(transformers, arch)(ARCHS[arch](**COMMON, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_load_scores_equal_transformers_on_padded_batches_hf_torch(arch, tmp_path):
    reference = _hf_model(arch)
    reference.save_pretrained(tmp_path)
    model, params = hf.load_pretrained(str(tmp_path))
    assert model.config.head == "score" and model.config.num_scores == 1
    assert "lm_head" not in params and params["score"].shape == (D, 1)
    ids = _padded_ids()
    expected, ours = _hf_scores(reference, ids), _our_scores(model, params, ids)
    err = float(np.max(np.abs(ours - expected)))
    print(f"\n{arch} load: max |score diff| {err:.3g} (tolerance {_tolerance(expected):.3g}, max |score| "
          f"{np.max(np.abs(expected)):.3g})")
    assert err <= _tolerance(expected)
    # Padding changes nothing: each row alone, unpadded, scores the same.
    for row, n in enumerate(LENGTHS):
        alone = _our_scores_single(model, params, ids[row, :n])
        assert abs(alone - ours[row]) <= _tolerance(expected)


def _our_scores_single(model, params, ids_T: np.ndarray) -> float:
    scores = model.apply({"params": params}, jnp.asarray(ids_T[None], jnp.int32))
    return float(scores[0, -1, 0])


@pytest.mark.parametrize("arch, preset", [("LlamaForSequenceClassification", llama_config),
                                          ("Qwen2ForSequenceClassification", qwen2_config)])
def test_save_scores_equal_transformers_on_padded_batches_hf_torch(arch, preset, tmp_path):
    config = preset(vocab_size=VOCAB, d_model=D, num_layers=LAYERS, num_heads=4, num_kv_heads=2, d_ff=FF,
                    max_len=64, norm_eps=1e-5)
    model = GPT(dataclasses.replace(config, head="score"))
    params = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree_util.tree_map(lambda x: x * 10.0 if x.ndim > 1 else x, nn.unbox(params))
    with pytest.raises(ValueError, match="needs pad_token_id"):
        hf.save_pretrained(model, params, str(tmp_path / "none"))
    hf.save_pretrained(model, params, str(tmp_path / "out"), pad_token_id=PAD)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == [arch] and saved["pad_token_id"] == PAD and len(saved["id2label"]) == 1
    reference = getattr(transformers, arch).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert reference.score.weight.shape == (1, D)
    ids = _padded_ids(seed=1)
    expected, ours = _hf_scores(reference, ids), _our_scores(model, params, ids)
    err = float(np.max(np.abs(ours - expected)))
    print(f"\n{arch} save: max |score diff| {err:.3g} (tolerance {_tolerance(expected):.3g})")
    assert err <= _tolerance(expected)
    # The conversion checks of train.export pass on it (every position's score).
    assert hf_verify.against_transformers(str(tmp_path / "out"), model, params)["logits"] <= hf_verify.tolerance(model)
    assert hf_verify.against_reloaded(str(tmp_path / "out"), model, params)["tensor"] == 0.0


def test_causal_lm_loads_under_a_fresh_score_head_and_a_reward_model_refuses_lm(tmp_path):
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval()
    lm.save_pretrained(tmp_path / "lm")
    model, params = hf.load_pretrained(str(tmp_path / "lm"), head="score")
    assert model.config.head == "score" and "lm_head" not in params
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), lm.model.embed_tokens.weight.detach().numpy())
    assert 0.01 < float(np.std(np.asarray(params["score"]))) < 0.03  # normal(0, 0.02), as transformers draws it
    reward = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**COMMON)).eval()
    reward.save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="reward model"):
        hf.load_pretrained(str(tmp_path / "rm"), head="lm")
    with pytest.raises(ValueError, match="1 label"):
        hf.model_of(str(tmp_path / "rm"), num_labels=2)
