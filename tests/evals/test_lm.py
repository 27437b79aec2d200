"""evals/lm.py: ModelLM against transformers on torch and lm-eval's `hf` backend on the same weights.

Two small random Hugging Face models are saved with tokenizer.json files trained on Unicode
text (no download): a LLaMA whose tokenizer template puts a bos `<s>` before every text (as
LLaMA's does) and a GPT-2 whose tokenizer adds nothing (its prefix token is <|endoftext|>).
The model vocabulary (320) is larger than the tokenizers' (300, 301), as padded vocabularies are.

  * loglikelihood and is_greedy equal float64 log_softmax of transformers' logits;
  * request by request, lm-eval's HFLM on the same directory gives the same loglikelihood,
    is_greedy, loglikelihood_rolling (windows of max_length) and greedy generate_until;
  * laid out on 8 devices (dp, fsdp), the results equal one device's; params already laid out
    are used where they are;
  * generate_until equals inference.generate's greedy tokens, cut at the eos and stop strings;
  * bad input: one-line errors.
"""

import json
import os

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import processors

from data.tokenizer import ByteLevelBPE, load_tokenizer
from data.tokenizer.hf_json import export_bpe
from evals.lm import ModelLM
from evals.lm_requests import cut_at_stops
from inference.generate import generate
from models import hf
from sharding import mesh as mesh_lib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TEXT = ("The quick brown fox jumps over the lazy dog. Über naïve café, 日本語のテキスト 🙂! "
        "Pack my box with five dozen liquor jugs.\n") * 8
VOCAB = 320
# One padded row length (MIN_BUCKET) and one generation shape (prompts of MAX_LENGTH - N tokens,
# N new ones in chunks of CHUNK) for every test: few compiles.
MAX_LENGTH, N, CHUNK = 16, 8, 4
EPS32 = float(np.finfo(np.float32).eps)
PARITY = 1e-4  # the promise: lm-eval's numbers within 1e-4

LL_REQUESTS = [
    ("The quick brown", " fox jumps"),
    ("The quick brown ", "fox jumps over"),  # the trailing space moves into the continuation
    ("Über naïve  ", "café, 日本語の"),  # two trailing spaces, multi-byte characters
    ("", "The lazy dog"),  # empty context: conditioned on the prefix token
    ("", "<|endoftext|>Pack my box"),  # ... unless the continuation starts with it (GPT-2's prefix)
    ("", "<s>Pack my box"),  # (LLaMA's prefix; plain text to GPT-2's tokenizer)
    ("<s>The quick", " brown fox"),  # a text starting with the bos text gets no second one
    (TEXT[:300], " five dozen"),  # longer than max_length: truncated from the left
    ("Pack", " my box with five dozen"),
    ("🙂", "!"),
]
ROLLING = [TEXT[:160], "Über naïve café", "", "x", "<s>The quick brown"]
CONTEXTS = ["The quick brown", "Über", "Pack my box with", "🙂", "The lazy dog"]


def _trained_bpe():
    return ByteLevelBPE.train(TEXT, 300)


def _save_tokenizer(directory, bpe, bos_template: bool) -> None:
    export_bpe(bpe, directory / "tokenizer.json")
    roles = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    if bos_template:
        tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        tok.add_special_tokens(["<s>"])
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        tok.save(str(directory / "tokenizer.json"))
        roles["bos_token"] = "<s>"
    (directory / "tokenizer_config.json").write_text(json.dumps(roles))


def _hf_model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=300, eos_token_id=299, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=299, eos_token_id=299)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # larger than the init's 0.02: clear greedy margins
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 and ("norm" in name or "ln_" in name)
                    else 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    bpe = _trained_bpe()
    dirs = {}
    for arch in ("llama", "gpt2"):
        directory = tmp_path_factory.mktemp(arch)
        _hf_model(arch).save_pretrained(directory, safe_serialization=True)
        _save_tokenizer(directory, bpe, bos_template=arch == "llama")
        dirs[arch] = directory
    return dirs


@pytest.fixture(scope="module")
def lms(hf_dirs):
    """ModelLM.from_path of each directory: dp over the 8 simulated devices."""
    out = {arch: ModelLM.from_path(str(d), batch_size=3, max_length=MAX_LENGTH) for arch, d in hf_dirs.items()}
    for lm in out.values():
        lm.decode_chunk = CHUNK
    return out


def _greedy_requests(directory) -> list[tuple[str, str]]:
    """(context, its float64 greedy next token's text) where the text encodes back to that token
    after the context: requests whose is_greedy holds."""
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).double().eval()
    out = []
    for end in range(3, 120, 4):
        context = TEXT[:end].rstrip()
        ids = tok.encode(context)
        if len(ids) >= MAX_LENGTH:
            break
        with torch.no_grad():
            best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        text = tok.decode([best])
        if best < len(tok) and tok.encode(context + text) == ids + [best]:
            out.append((context, text))
    return out[:3]  # the random GPT-2 prefers partial UTF-8 bytes: none there


def _float64_reference(directory, context_ids, continuation_ids):
    """(sum log p(continuation), is_greedy, smallest top-2 logit margin, largest |logit|) from
    float64 log_softmax of transformers' logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).double().eval()
    out = []
    for ctx, cont in zip(context_ids, continuation_ids):
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:]
        logps = torch.log_softmax(logits, -1)
        top2 = torch.topk(logits, 2).values
        out.append((float(logps[torch.arange(len(cont)), torch.tensor(cont)].sum()),
                    bool((logits.argmax(-1) == torch.tensor(cont)).all()),
                    float((top2[:, 0] - top2[:, 1]).min()), float(logits.abs().max())))
    return out


def test_loglikelihood_equals_float64_log_softmax_of_transformers(hf_dirs, lms):
    directory, lm = hf_dirs["llama"], lms["llama"]
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    # Contexts without trailing whitespace or a bos text of their own: the continuation's ids
    # are what the whole text has past the context's (transformers' tokenizer, with its bos).
    # lm-eval's other cases are compared with lm-eval below.
    requests = [r for r in LL_REQUESTS if r[0] and r[0] == r[0].rstrip() and not r[0].startswith("<s>")]
    requests += _greedy_requests(directory)
    ctx = [tok.encode(c) for c, _ in requests]
    cont = [tok.encode(c + k)[len(i):] for (c, k), i in zip(requests, ctx)]
    fits = [j for j, (i, k) in enumerate(zip(ctx, cont)) if len(i) + len(k) <= MAX_LENGTH + 1]
    assert len(fits) >= 6
    requests, ctx, cont = ([x[j] for j in fits] for x in (requests, ctx, cont))
    reference = _float64_reference(directory, ctx, cont)
    ours = lm.loglikelihood(requests)
    for (c, k), (logp, greedy), (ref, ref_greedy, margin, scale), n in zip(requests, ours, reference, map(len, cont)):
        # float32 logits: each a few roundings of its magnitude; n scored tokens, each a logit
        # minus a logsumexp.
        tol = 64 * EPS32 * scale * n
        assert abs(logp - ref) <= tol, (c, k, logp, ref, tol)
        if margin > tol:  # the float64 argmax is the float32 one
            assert greedy == ref_greedy, (c, k)
    assert sum(g for _, g in ours) >= 2, "is_greedy was not exercised"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_requests_equal_lm_evals_hf_backend(arch, hf_dirs, lms):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = lms[arch]
    theirs_lm = HFLM(pretrained=str(hf_dirs[arch]), batch_size=3, device="cpu", max_length=MAX_LENGTH)

    def instances(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

    requests = LL_REQUESTS + _greedy_requests(hf_dirs[arch])
    theirs = theirs_lm.loglikelihood(instances("loglikelihood", requests))
    ours = lm.loglikelihood(instances("loglikelihood", requests))  # Instances are accepted too
    assert [g for _, g in ours] == [g for _, g in theirs]
    np.testing.assert_allclose([v for v, _ in ours], [v for v, _ in theirs], rtol=0, atol=PARITY)
    assert arch == "gpt2" or sum(g for _, g in ours) >= 2  # is_greedy exercised

    theirs = theirs_lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in ROLLING]))
    ours = lm.loglikelihood_rolling(ROLLING)
    assert lm.token_count(ROLLING[0]) > 3 * MAX_LENGTH  # several windows
    # A total of several windows' float32 sums (each rounded at its magnitude): within a few
    # roundings of the total, and the 1e-4 of a single request where that is larger.
    assert np.all(np.abs(np.subtract(ours, theirs)) <= np.maximum(PARITY, 16 * EPS32 * np.abs(theirs))), (ours, theirs)

    if arch == "llama":  # (generation's conventions do not depend on the tokenizer's template)
        generation = [(c, {"until": ["."], "max_gen_toks": N}) for c in CONTEXTS] + [
            (TEXT[:40], {"until": ["\n", "fox"], "max_gen_toks": N, "do_sample": False})]  # left-truncated
        assert lm.generate_until(generation) == theirs_lm.generate_until(instances("generate_until", generation))


@pytest.fixture(scope="module")
def llama(hf_dirs):
    model, params = hf.load_pretrained(str(hf_dirs["llama"]))
    return model, params, load_tokenizer(str(hf_dirs["llama"]))


def _scores(lm):
    return lm.loglikelihood(LL_REQUESTS), lm.loglikelihood_rolling(ROLLING)


def _texts(lm):
    lm.decode_chunk = CHUNK
    return lm.generate_until([(c, {"until": ["."], "max_gen_toks": N}) for c in CONTEXTS])


def _assert_same(a, b):
    (ll_a, rolling_a), (ll_b, rolling_b) = a, b
    assert [g for _, g in ll_a] == [g for _, g in ll_b]
    # The same per-row arithmetic, compiled for another layout: a few roundings of each value.
    values_a = np.array([v for v, _ in ll_a] + rolling_a)
    values_b = np.array([v for v, _ in ll_b] + rolling_b)
    assert np.all(np.abs(values_a - values_b) <= 16 * EPS32 * np.maximum(np.abs(values_b), 1.0))


def test_sharded_equals_one_device_and_laid_out_params_are_not_copied(llama, lms):
    model, params, tokenizer = llama
    one = ModelLM(model, params, tokenizer, batch_size=3, max_length=MAX_LENGTH,
                  mesh=mesh_lib.make_mesh("data=1", jax.devices()[:1]))
    expected = _scores(one)
    dp = ModelLM(model, params, tokenizer, batch_size=3, max_length=MAX_LENGTH, strategy="dp")
    assert dp.mesh.size == 8 and dp.rows == 8  # batch_size rounded up to the 8 data-parallel devices
    _assert_same(_scores(dp), expected)
    texts = _texts(lms["llama"])  # dp over 8 devices, equal to lm-eval's and inference.generate's (below)

    fsdp = ModelLM(model, params, tokenizer, batch_size=3, max_length=MAX_LENGTH, strategy="fsdp")
    kernel = fsdp.params["layer_0"]["mlp"]["wi_up"]
    assert kernel.addressable_shards[0].data.size * 8 == kernel.size  # each device holds 1/8
    _assert_same(_scores(fsdp), expected)
    assert _texts(fsdp) == texts

    # The trainer's case: params laid out already are read where they are (fsdp from their mesh).
    live = ModelLM(model, fsdp.params, tokenizer, batch_size=3, max_length=MAX_LENGTH)
    assert live.strategy.name == "fsdp" and live.mesh is fsdp.mesh
    assert all(a is b for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(fsdp.params)))
    _assert_same(_scores(live), expected)
    assert _texts(live) == texts


def test_generate_until_equals_inference_generate_cut_at_stops(llama, lms):
    model, params, tokenizer = llama
    lm = lms["llama"]  # dp over 8 devices, N new tokens in chunks of CHUNK
    eos = tokenizer.eos_id
    eos_text = tokenizer.decode([eos])
    # LLaMA's template puts the bos first; lm-eval keeps the last max_length - N prompt tokens.
    prompts = [([tokenizer.bos_id] + tokenizer.encode(c))[-(MAX_LENGTH - N):] for c in CONTEXTS]
    free = generate(model, params, prompts, max_new_tokens=N, stop_tokens=(eos,))
    # Text as lm-eval decodes it: no special tokens, nor ids of the model's padded vocabulary.
    free_texts = [tokenizer.decode([t for t in row if t < tokenizer.vocab_size and t not in (eos, tokenizer.bos_id)])
                  for row in free]
    # Stop strings met partway through some rows' greedy text; one request keeps eos only.
    untils = [[free_texts[0][2:4]], [free_texts[1][3:4], "zzz"], [], ["\n"], [free_texts[4][1:3]]]
    requests = [(c, {"until": u, "max_gen_toks": N}) for c, u in zip(CONTEXTS, untils)]
    expected = [cut_at_stops(t, u + [eos_text]) for t, u in zip(free_texts, untils)]
    assert sum(e != t for e, t in zip(expected, free_texts)) >= 2  # the stop strings cut
    assert lm.generate_until(requests) == expected


def test_sampling_is_seeded(lms):
    lm = lms["llama"]

    def sampled(seed):
        return lm.generate_until([(c, {"temperature": 1.0, "max_gen_toks": N, "seed": seed}) for c in CONTEXTS[:3]])

    first = sampled(3)
    assert sampled(3) == first and sampled(4) != first


def _one_line(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message and all(p in message for p in parts), message


def test_bad_input_is_named_in_one_line(llama, hf_dirs, lms, tmp_path):
    model, params, tokenizer = llama
    lm = ModelLM(model, params, tokenizer, batch_size=2, max_length=MAX_LENGTH,
                 mesh=mesh_lib.make_mesh("data=1", jax.devices()[:1]))
    cases = [
        (lambda: lm.loglikelihood([("a", "b"), ("only a context",)]), ("loglikelihood request 1", "(str, str)")),
        (lambda: lm.loglikelihood([("a", "")]), ("request 0", "at least one token")),
        # (GPT-2's tokenizer adds no bos: nothing is left to condition on; LLaMA's adds one)
        (lambda: lms["gpt2"].loglikelihood([(" ", "a")]), ("request 0", "whitespace only")),
        (lambda: lm.loglikelihood([("a", TEXT[:400])]), (f"more than max_length={MAX_LENGTH}",)),
        (lambda: lm.loglikelihood_rolling([3]), ("loglikelihood_rolling request 0",)),
        (lambda: lm.generate_until([("a", {"max_gen_toks": MAX_LENGTH})]),
         ("request 0", "no room", f"max_gen_toks < {MAX_LENGTH}")),
        (lambda: lm.generate_until([("a", {"stop": ["\n"]})]), ("unknown generation kwarg 'stop'",)),
        (lambda: ModelLM(model, params, tokenizer, max_length=65), ("max_length=65", "max_len=64")),
        (lambda: ModelLM(model, params, tokenizer, batch_size=0), ("batch_size must be a positive integer",)),
        (lambda: ModelLM(model, {"embed": params["embed"]}, tokenizer), ("do not match the model",)),
        (lambda: ModelLM(model, lms["llama"].params, tokenizer, mesh=lm.mesh), ("laid out on mesh {'data': 8}",)),
        (lambda: ModelLM(model, params, tokenizer, mesh=mesh_lib.make_mesh("data=8"), strategy="fsdp"),
         ("strategy `fsdp`", "mesh axis `fsdp`")),
        (lambda: ModelLM.from_path(str(hf_dirs["llama"]), strategy="zero4"), ("unknown sharding strategy 'zero4'",)),
    ]
    for call, parts in cases:
        with pytest.raises(ValueError) as e:
            call()
        _one_line(e, *parts)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError) as e:
        ModelLM.from_path(str(tmp_path))
    _one_line(e, "neither a `python -m train` workdir", "nor a Hugging Face model directory")


def test_token_count_has_no_specials(llama, hf_dirs):
    model, params, tokenizer = llama
    tok = transformers.AutoTokenizer.from_pretrained(hf_dirs["llama"])
    lm = ModelLM(model, params, tokenizer, mesh=mesh_lib.make_mesh("data=1", jax.devices()[:1]))
    for text in ROLLING:
        assert lm.token_count(text) == len(tok.encode(text, add_special_tokens=False))
