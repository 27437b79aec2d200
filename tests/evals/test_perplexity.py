"""evals/metrics/perplexity.py against the loop of transformers' "Perplexity of fixed-length
models", run on small random GPT-2 and LLaMA models on torch whose weights are copied into lmlab.

The reference loop runs in float64 (the exact value of what the docs compute) and in float32
(what the docs run); ours is float32, so the tolerance is float32's error of the logits.
"""

import copy
import functools
import math

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from evals.metrics.perplexity import sliding_window_perplexity, sliding_windows
from models.convert import gpt2 as gpt2_convert
from models.convert import llama as llama_convert
from models.gpt import GPT

VOCAB, CONTEXT = 53, 32
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Many tiny torch forwards: one thread is much faster than several spinning on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _hf_model(family: str):
    """A random HF causal LM, norms and biases away from their 1 / 0 initial values."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4,
                                         n_inner=48, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=CONTEXT, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.3 * torch.randn_like(p))
    return model


@functools.cache
def _ours(family: str):
    hf = _hf_model(family)
    convert = gpt2_convert if family == "gpt2" else llama_convert
    config = convert.config_from_hf(hf.config.to_dict())
    return GPT(config), jax.device_put(convert.hf_to_params(hf.state_dict(), config))


def documented_loop(model, ids: np.ndarray, max_length: int, stride: int) -> tuple[float, float, int]:
    """transformers' strided perplexity loop, as its docs write it, on one row of ids."""
    encodings = torch.tensor(ids[None], dtype=torch.long)
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(float(nll_sum) / n_tokens), float(nll_sum), n_tokens


@functools.cache
def _float64(family: str):
    return copy.deepcopy(_hf_model(family)).double()


def _nll_tolerance(family: str, ids: np.ndarray) -> float:
    """float32 error of a mean NLL: a few eps32 * sqrt(reduction lengths) * logit magnitude."""
    hf = _hf_model(family)
    with torch.no_grad():
        logits = hf(torch.tensor(ids[None, :CONTEXT], dtype=torch.long)).logits
    d, layers = hf.config.hidden_size, hf.config.num_hidden_layers
    return 8 * EPS32 * math.sqrt(d * layers + VOCAB + CONTEXT) * (1 + float(logits.abs().max()))


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n)


def _check_against_loop(family, ids, max_length, stride, **kwargs):
    model, params = _ours(family)
    ours = sliding_window_perplexity(model, params, ids, max_length=max_length, stride=stride, **kwargs)
    exact = documented_loop(_float64(family), ids, max_length, stride)
    as_run = documented_loop(_hf_model(family), ids, max_length, stride)
    tol = _nll_tolerance(family, ids)
    print(f"\n{family} n={len(ids)} max_length={max_length} stride={stride}: ppl {ours.perplexity:.6f}, "
          f"float64 loop {exact[0]:.6f}, float32 loop {as_run[0]:.6f}; |mean nll diff| "
          f"{abs(ours.nll_sum / ours.num_tokens - exact[1] / exact[2]):.2g} (tolerance {tol:.2g})")
    assert ours.num_tokens == exact[2] == as_run[2]
    for reference, factor in ((exact, 1), (as_run, 2)):
        assert abs(ours.nll_sum - reference[1]) <= factor * tol * ours.num_tokens
        assert abs(math.log(ours.perplexity) - math.log(reference[0])) <= factor * tol
    return ours


@pytest.mark.parametrize("max_length,stride,n", [
    (16, 16, 70),  # disjoint windows
    (16, 5, 70),  # overlapping windows: each mean over trg_len tokens weighted by trg_len - 1
    (CONTEXT, 7, 90),  # the model's whole context
    (16, 4, 10),  # a text shorter than max_length: one window
])
def test_gpt2_equals_documented_loop(max_length, stride, n):
    ours = _check_against_loop("gpt2", _ids(n), max_length, stride)
    windows = sliding_windows(n, max_length=max_length, stride=stride)
    assert ours.num_tokens == n - len(windows)  # the docs' count: one less per window


@pytest.mark.parametrize("max_length,stride", [(16, 16), (16, 6)])
def test_llama_equals_documented_loop(max_length, stride):
    _check_against_loop("llama", _ids(70, seed=1), max_length, stride)


def test_batching_windows_changes_nothing():
    model, params = _ours("gpt2")
    ids = _ids(70)
    one = sliding_window_perplexity(model, params, ids, max_length=16, stride=5, batch_size=1)
    many = sliding_window_perplexity(model, params, ids, max_length=16, stride=5)  # 8 windows a batch
    tol = _nll_tolerance("gpt2", ids)
    assert one.num_tokens == many.num_tokens
    assert abs(one.nll_sum - many.nll_sum) <= tol * one.num_tokens


def test_sharded_params_equal_unsharded():
    """Params laid out over 8 devices (the trainer's live params are): same perplexity."""
    model, params = _ours("gpt2")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

    def place(x):
        spec = P("data") if x.shape[0] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = jax.tree_util.tree_map(place, params)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree_util.tree_leaves(sharded))
    ids = _ids(40)
    ours = sliding_window_perplexity(model, sharded, ids, max_length=16, stride=6)
    plain = sliding_window_perplexity(model, params, ids, max_length=16, stride=6)
    assert ours.num_tokens == plain.num_tokens
    assert abs(ours.nll_sum - plain.nll_sum) <= _nll_tolerance("gpt2", ids) * ours.num_tokens


def test_one_token_last_window_adds_nothing():
    """Disjoint windows over n = 4 * 16 + 1 tokens: the last window holds one token. The docs'
    loop returns NaN there (0 * the NaN mean over no labels); ours leaves the window out, which
    is the loop's value without that token."""
    model, params = _ours("gpt2")
    ids = _ids(65, seed=2)
    assert math.isnan(documented_loop(_hf_model("gpt2"), ids, 16, 16)[0])
    ours = sliding_window_perplexity(model, params, ids, max_length=16, stride=16)
    exact = documented_loop(_float64("gpt2"), ids[:64], 16, 16)
    assert ours.num_tokens == exact[2] == 60
    assert abs(math.log(ours.perplexity) - math.log(exact[0])) <= _nll_tolerance("gpt2", ids)


def test_windows_score_every_token_once():
    """Windows tile the text: each token is scored by one window, with context before it in
    that window, except a window's first token when it has none there (the text's first token;
    with disjoint windows, each window's first)."""
    for n, max_length in [(n, m) for n in (2, 3, 17, 40) for m in (2, 5, 16)]:
        for stride in range(1, max_length + 1):
            scored, unscored, prev_end = [], [], 0
            for w in sliding_windows(n, max_length=max_length, stride=stride):
                assert w.end - w.begin <= max_length and w.end - w.targets == prev_end >= w.begin
                scored += range(max(w.begin + 1, prev_end), w.end)
                unscored += [w.begin] if w.begin == prev_end else []
                prev_end = w.end
            assert prev_end == n and sorted(scored + unscored) == list(range(n))
            assert unscored == ([0] if stride < max_length else list(range(0, n, stride)))


@pytest.mark.parametrize("kwargs,match", [
    ({"max_length": 16, "stride": 17}, r"stride=17 must be in \[1, max_length=16\]"),
    ({"max_length": 16, "stride": 0}, r"stride=0 must be in \[1, max_length=16\]"),
    ({"max_length": CONTEXT + 1, "stride": 4}, rf"max_length={CONTEXT + 1} must be in \[2, {CONTEXT}\]"),
    ({"max_length": 1, "stride": 1}, r"max_length=1 must be in \[2, "),
    ({"ids": np.zeros((2, 10), int), "max_length": 8, "stride": 4}, r"\(1-D\), got shape \(2, 10\)"),
    ({"ids": [3], "max_length": 8, "stride": 4}, "needs at least 2"),
    ({"ids": [3, VOCAB], "max_length": 8, "stride": 4}, rf"token id {VOCAB} is outside"),
    ({"ids": [0.5, 1.0], "max_length": 8, "stride": 4}, "integer token ids"),
])
def test_bad_input_is_one_line(kwargs, match):
    model, params = _ours("gpt2")
    kwargs = {"ids": _ids(20), **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        sliding_window_perplexity(model, params, **kwargs)
    assert "\n" not in str(info.value)
