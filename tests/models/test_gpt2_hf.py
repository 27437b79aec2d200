"""models/convert/gpt2.py against Hugging Face GPT2LMHeadModel on torch (random, no download)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models.convert.gpt2 import config_from_hf, hf_to_params, params_to_hf
from models.gpt import GPT
from tests.torch_reference import assert_same_logits, assert_same_state_dict

VOCAB = 57


def _hf_model(tie: bool):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # norms and biases away from 1 / 0
        for name, p in model.named_parameters():
            shift = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(shift + 0.2 * torch.randn_like(p))
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt2_hf_torch_logits_round_trip_and_count(tie):
    hf = _hf_model(tie)
    cfg = config_from_hf(hf.config.to_dict())
    params = hf_to_params(hf.state_dict(), cfg)
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 16))
    ours = np.asarray(jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x))(params, jnp.asarray(ids, jnp.int32)))
    theirs = _hf_logits(hf, ids)
    err = np.max(np.abs(ours - theirs))
    print(f"\nGPT-2 ({'tied' if tie else 'untied'}) vs transformers: max |diff| = {err:.3g}, "
          f"relative {err / np.max(np.abs(theirs)):.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.max(np.abs(theirs)))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())

    fresh = transformers.GPT2LMHeadModel(hf.config).eval()
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params_to_hf(params, cfg).items()}, strict=True)
    assert_same_state_dict(fresh, hf)
    assert_same_logits(_hf_logits(fresh, ids), theirs)


def test_gpt2_missing_tensor_is_named():
    hf = _hf_model(True)
    sd = dict(hf.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.bias'\]"):
        hf_to_params(sd, config_from_hf(hf.config.to_dict()))
