"""evals/metrics/bertscore.py against the `bert-score` package on the real all-MiniLM-L6-v2.

bert-score loads the same local directory (model_type=<dir>, num_layers given: it has no
default layer for a path) with transformers on torch; it reads nothing from the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: nothing to fetch, and nothing may be

import bert_score
import numpy as np
import pytest
import torch
import transformers

# The module's own names (the package attribute `evals.metrics.bertscore` is the function).
from evals.metrics.bertscore import _load_encoder, bertscore, load_encoder
from tests.minilm import minilm_path

# The tolerance; float32 on both sides agrees to ~3e-7.
TOL = 1e-4

HYPS = [
    "The cat sat on the mat.",
    "",  # empty hypothesis
    "Ünïcödé façade — naïve café, ½ ﬁne!",
    "東京は日本の首都です。",
    "emoji 😀 here!!",
    "a quick brown fox",
    "   \t ",  # whitespace only: empty after strip
    "Numbers: 3.14, 2,718; and -1e9? (yes) [SEP] inside",
    "Hello",
    "The cat sat on the mat.",  # a duplicate text
    "مرحبا بالعالم — Ελληνικά κείμενα",
    "the cat",  # its best P and best F come from different references
]
REFS = [
    ["A cat was sitting on the mat.", "the mat had a cat", "Dogs bark."],
    ["nothing here"],
    "unicode facade, naive cafe",  # a str is one reference
    ["Tokyo is the capital of Japan.", "東京"],
    ["emoji here", "😀"],
    ["The quick brown fox jumps over the lazy dog.", "", "fox"],  # an empty reference
    ["blank"],
    ["numbers 3.14 and 2.718", "No numbers at all."],
    ["A cat was sitting on the mat.", "Completely unrelated words about economics and trade."],
    ["The cat sat on the mat."],
    ["hello world", "Greek text"],
    ["the cat sat on the mat under a hat in the sun", "the dog"],
]


@pytest.fixture(autouse=True)
def _bert_score_on_transformers_5(monkeypatch):
    """bert-score 0.3.13 encodes an empty text with `build_inputs_with_special_tokens([])`,
    which transformers 5's BertTokenizer no longer has; put back what transformers 4's did
    ([CLS] ids [SEP]) so the reference runs on empty texts."""
    def build(self, ids, ids_pair=None):
        pair = [] if ids_pair is None else [*ids_pair, self.sep_token_id]
        return [self.cls_token_id, *ids, self.sep_token_id, *pair]

    monkeypatch.setattr(transformers.BertTokenizer, "build_inputs_with_special_tokens", build, raising=False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The reference's many small forwards: one thread is much faster than several spinning on
    2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(hyps, refs, **kwargs):
    refs = [[r] if isinstance(r, str) else r for r in refs]
    # nthreads=0: no multiprocessing fork of a process that runs jax.
    p, r, f = bert_score.score(hyps, refs, model_type=str(minilm_path()), nthreads=0, **kwargs)
    return np.stack([p.numpy(), r.numpy(), f.numpy()])


def _ours(hyps, refs, **kwargs):
    return np.stack(bertscore(hyps, refs, model_dir=minilm_path(), **kwargs))


@pytest.mark.parametrize("num_layers,idf", [(0, False), (3, True), (6, False)])
def test_equals_bert_score(num_layers, idf):
    ours = _ours(HYPS, REFS, num_layers=num_layers, idf=idf)
    theirs = _reference(HYPS, REFS, num_layers=num_layers, idf=idf)
    print(f"\nL={num_layers} idf={idf}: max |ours - bert_score| = {np.max(np.abs(ours - theirs)):.2g}")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
    assert np.all(ours[:, [1, 6]] == 0)  # empty hypotheses score 0
    assert np.all(ours[:, 5] > 0)  # an empty reference among others does not zero the item
    assert np.all(np.isfinite(ours))


def test_batches_and_padding_convention_as_bert_score():
    """bert-score's padding gives a negative best cosine 0 when the other text is shorter than
    the longest of its batch; the data here hit that at the last layer, so scores depend on the
    batch size, and equal bert-score's at each batch size."""
    batched = _ours(HYPS, REFS, num_layers=6)  # batch_size 64: one batch
    alone = _ours(HYPS, REFS, num_layers=6, batch_size=1)  # no padding
    np.testing.assert_allclose(alone, _reference(HYPS, REFS, num_layers=6, batch_size=1), rtol=0, atol=TOL)
    assert np.max(np.abs(alone - batched)) > 10 * TOL  # the convention is exercised (and checked above)


def test_long_texts_are_truncated_as_bert_score():
    """Past 512 tokens ([CLS] and [SEP] included) a text is cut, as transformers cuts it."""
    hyps, refs = ["word " * 600 + "end"], [["many words " * 300]]
    encoder = load_encoder(minilm_path())
    assert len(encoder.encode(hyps[0])) == 512
    np.testing.assert_allclose(_ours(hyps, refs, num_layers=1), _reference(hyps, refs, num_layers=1),
                               rtol=0, atol=TOL)


def test_each_of_p_r_f_is_its_own_maximum_over_references():
    """Several references: P, R and F are each maximized separately (bert-score's per-column
    max), which the data exercise: some item's best P comes from another reference than its best F."""
    flat_hyps = [h for h, refs in zip(HYPS, REFS) for _ in ([refs] if isinstance(refs, str) else refs)]
    flat_refs = [r for refs in REFS for r in ([refs] if isinstance(refs, str) else refs)]
    pairs = _ours(flat_hyps, flat_refs, num_layers=6, batch_size=1)
    ours = _ours(HYPS, REFS, num_layers=6, batch_size=1)
    start, mixed = 0, False
    for i, refs in enumerate(REFS):
        n = 1 if isinstance(refs, str) else len(refs)
        block = pairs[:, start: start + n]
        np.testing.assert_array_equal(ours[:, i], block.max(axis=1))
        mixed |= bool(np.argmax(block[0]) != np.argmax(block[2]))
        start += n
    assert mixed


def test_idf_degenerate_weights_are_nan_as_bert_score():
    """idf over one reference weighs its every piece 0: recall is 0/0 = NaN and F is 0 in
    bert-score; a hypothesis made only of pieces in every reference has NaN precision."""
    hyps, refs = ["a cat sat", "the"], [["the cat"], ["the dog"]]
    for h, r in [(hyps[:1], refs[:1]), (hyps, refs)]:
        ours, theirs = _ours(h, r, num_layers=3, idf=True), _reference(h, r, num_layers=3, idf=True)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        assert np.isnan(ours).any()
        np.testing.assert_allclose(np.nan_to_num(ours), np.nan_to_num(theirs), rtol=0, atol=TOL)


def test_identical_texts_score_one_and_model_loads_once():
    before = _load_encoder.cache_info()
    score = bertscore(["Same text, twice."], [["Same text, twice."]], model_dir=str(minilm_path()), num_layers=3)
    np.testing.assert_allclose(np.stack(score), 1.0, atol=1e-5)
    bertscore(["x"], ["y"], model_dir=minilm_path() / ".." / "model", num_layers=3)
    after = _load_encoder.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 1


@pytest.mark.parametrize("call,match", [
    (lambda: bertscore(["a", "b"], [["a"]], model_dir=minilm_path(), num_layers=1), "2 hypotheses but 1"),
    (lambda: bertscore(["a"], [[]], model_dir=minilm_path(), num_layers=1), "empty list of references"),
    (lambda: bertscore(["a"], ["a"], model_dir=minilm_path(), num_layers=7), r"num_layers=7 is outside \[0, 6\]"),
    (lambda: bertscore("a", ["a"], model_dir=minilm_path(), num_layers=1), "not a single str"),
    (lambda: bertscore(["a", "b"], ["a", ["b", None]], model_dir=minilm_path(), num_layers=1),
     "item 1 holds NoneType None, not a str"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_a_decoder_directory_is_refused(tmp_path):
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="does not hold a BERT encoder") as info:
        bertscore(["a"], ["a"], model_dir=tmp_path, num_layers=1)
    assert "\n" not in str(info.value)
