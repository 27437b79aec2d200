"""Greedy `inference.generate` on weights read by `models.hf.load_pretrained` equals transformers'
greedy `generate` token for token, for a batch of prompts of different lengths.

Small random HF models are built and saved to tmp dirs (no download). transformers runs the
batch left-padded with an attention mask (its positions then count real tokens only, as
ours do with right padding and per-row positions); an eos taken from a first run makes some
rows stop early, so the stopping and padding conventions are compared too.
"""

import pytest
import torch
import transformers

from inference import generate
from models import hf

VOCAB, PAD, MAX_NEW = 61, 0, 10
PROMPTS = [[5, 9, 13, 2, 44], [7, 3, 21, 8, 30, 11, 19, 25, 4], [17, 6, 50]]
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}
CASES = {
    "LlamaForCausalLM": (transformers.LlamaConfig, {**SMALL, "intermediate_size": 48, "tie_word_embeddings": False}),
    "Qwen3ForCausalLM": (transformers.Qwen3Config, {**SMALL, "intermediate_size": 48, "head_dim": 16,
                                                    "tie_word_embeddings": False}),
    "GPT2LMHeadModel": (transformers.GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "MixtralForCausalLM": (transformers.MixtralConfig, {**SMALL, "intermediate_size": 24, "num_local_experts": 4,
                                                        "num_experts_per_tok": 2}),
}


def _hf_model(arch: str):
    config_cls, kw = CASES[arch]
    torch.manual_seed(0)
    # No default eos (LLaMA's is 2): each run names its own.
    config = config_cls(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, attn_implementation="eager", **kw)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # larger than the init's 0.02, so that the greedy choice has clear margins
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 and ("norm" in name or "ln_" in name)
                    else 0.2 * torch.randn_like(p))
    return model


def _hf_greedy(model, eos: int | None, repetition_penalty: float | None = None) -> list[list[int]]:
    """transformers' batched greedy generate (left padding), new tokens per prompt cut after eos."""
    T = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                             pad_token_id=PAD, eos_token_id=eos, repetition_penalty=repetition_penalty, top_k=None,
                             top_p=None, temperature=None)
    rows = []
    for row in out[:, T:].tolist():
        new = []
        for t in row:
            new.append(t)
            if t == eos:
                break
        rows.append(new)
    return rows


@pytest.mark.parametrize("arch", CASES)
def test_greedy_generate_equals_transformers_hf_torch(arch, tmp_path):
    reference = _hf_model(arch)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model, params = hf.load_pretrained(str(tmp_path))

    free = _hf_greedy(reference, eos=None)
    assert all(len(r) == MAX_NEW for r in free)
    eos = free[0][3]  # row 0 stops at its 4th token (or earlier); the others when they meet it
    theirs = _hf_greedy(reference, eos=eos)
    assert any(len(r) < MAX_NEW for r in theirs)

    ours = generate(model, params, PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=(eos,))
    print(f"\n{arch}: eos {eos}, ours == transformers for lengths {[len(r) for r in ours]}")
    assert ours == theirs
    assert generate(model, params, PROMPTS, max_new_tokens=MAX_NEW) == free


def test_greedy_generate_with_repetition_penalty_equals_transformers_hf_torch(tmp_path):
    """The penalty counts each row's real prompt tokens and its generated ones, not the padding."""
    reference = _hf_model("LlamaForCausalLM")
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model, params = hf.load_pretrained(str(tmp_path))
    theirs = _hf_greedy(reference, eos=None, repetition_penalty=1.5)
    assert theirs != _hf_greedy(reference, eos=None)  # the penalty changes the output
    assert generate(model, params, PROMPTS, max_new_tokens=MAX_NEW, repetition_penalty=1.5) == theirs
