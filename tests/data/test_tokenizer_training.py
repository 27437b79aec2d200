"""Tokenizer training: the sample is bounded, seeded and streamed; our trainer and the
`tokenizers` library's learn the same merges on it, and each saved result loads through
`load_tokenizer`, round-trips text and gives the same ids."""

import os
import pydoc_data.topics

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from configs.loader import load_config
from data.tokenizer import ByteLevelBPE, load_tokenizer, training
from data.tokenizer.hf_json import HFJsonTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCUMENTS = [text for _, text in sorted(pydoc_data.topics.topics.items())]
EOT, MASK = "<|endoftext|>", "[MASK]"


class CountingDocuments:
    """A random-access sequence of texts that records which documents were read."""

    def __init__(self, texts):
        self.texts, self.read = texts, []

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, index):
        self.read.append(index)
        return self.texts[index]


def _nbytes(texts):
    return sum(len(t.encode("utf-8")) for t in texts)


def test_sample_is_bounded_seeded_and_reads_only_what_it_yields():
    documents = CountingDocuments(DOCUMENTS)
    sample = list(training.sample_documents(documents, 50_000, seed=1))
    assert _nbytes(sample) == 50_000  # the last document is cut to fit exactly
    assert len(documents.read) == len(sample) < len(DOCUMENTS) / 3  # streamed: nothing read ahead
    assert sample[:-1] == [DOCUMENTS[i] for i in documents.read[:-1]]
    assert DOCUMENTS[documents.read[-1]].startswith(sample[-1])
    assert sample == list(training.sample_documents(DOCUMENTS, 50_000, seed=1))
    assert sample != list(training.sample_documents(DOCUMENTS, 50_000, seed=2))
    assert sorted(documents.read) != documents.read  # a shuffled order, not the source order


def test_whole_sample_holds_every_document_once_and_cuts_at_a_character():
    assert sorted(training.sample_documents(DOCUMENTS, 0, seed=0)) == sorted(DOCUMENTS)
    assert sorted(training.sample_documents(DOCUMENTS, 10**9, seed=0)) == sorted(DOCUMENTS)
    (cut,) = training.sample_documents(["é" * 10], 5, seed=0)  # 2-byte characters: 2 fit in 5 bytes
    assert cut == "éé"
    with pytest.raises(ValueError, match="max_bytes=-1 must be >= 0"):
        next(training.sample_documents(DOCUMENTS, -1, seed=0))


@pytest.fixture(scope="module", params=[(EOT,), (EOT, MASK)], ids=["gpt", "bert"])
def trained(request, tmp_path_factory):
    """Both trainers on the same 150 KB sample, saved and loaded back through load_tokenizer."""
    special = request.param
    root = tmp_path_factory.mktemp("trained")
    loaded = {}
    for trainer in training.TRAINERS:
        sample = training.sample_documents(DOCUMENTS, 150_000, seed=0)
        returned = training.train_tokenizer(sample, 1024, special, trainer=trainer, directory=root / trainer)
        loaded[trainer] = load_tokenizer(root / trainer)
        assert returned.encode("The quick fox") == loaded[trainer].encode("The quick fox")
    assert isinstance(loaded["lmlab"], ByteLevelBPE) and isinstance(loaded["tokenizers"], HFJsonTokenizer)
    return special, loaded


def test_both_trainers_learn_the_same_merges(trained):
    special, _ = trained
    ours = ByteLevelBPE.train(training.sample_documents(DOCUMENTS, 150_000, seed=0), 1024, special)
    theirs = training.train_library_bpe(training.sample_documents(DOCUMENTS, 150_000, seed=0), 1024, special)
    assert len(ours.merges()) == 1024 - 256 - len(special)
    assert theirs.merges() == ours.merges()  # one for one, in order: same counts, same tie-breaking
    assert theirs.special_tokens == ours.special_tokens


def test_both_trained_tokenizers_have_the_same_roles_and_ids(trained):
    special, loaded = trained
    ours, theirs = loaded["lmlab"], loaded["tokenizers"]
    for role in ("vocab_size", "eos_id", "bos_id", "pad_id", "mask_id"):
        assert getattr(ours, role) == getattr(theirs, role), role
    assert (ours.mask_id is not None) == (MASK in special)
    held_out = DOCUMENTS[-1]
    ids = ours.encode(held_out)
    assert theirs.encode(held_out) == ids and len(ids) < len(held_out.encode()) / 2  # merges apply


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
@example(text="héllo wörld\u2028\x00 😀👍🏽 don't \r\n\t ")
def test_both_trained_tokenizers_round_trip_and_agree(trained, text):
    _, loaded = trained
    ours, theirs = loaded["lmlab"], loaded["tokenizers"]
    ids = theirs.encode(text)
    assert theirs.decode(ids) == text and ours.decode(ours.encode(text)) == text
    if EOT not in text and MASK not in text:
        # tokenizer.json marks specials, which the library then finds in any text; ours only
        # when asked (`allowed_special`), so text naming a special token is the one difference.
        assert ids == ours.encode(text)


def test_library_trainer_finds_special_tokens_in_text(trained):
    _, loaded = trained
    ours, theirs = loaded["lmlab"], loaded["tokenizers"]
    text = f"a{EOT}b"
    assert theirs.encode(text) == ours.encode(text, allowed_special="all") != ours.encode(text)


def test_build_trains_the_configured_trainer_on_a_bounded_sample(tmp_path):
    from configs import base
    from train import build

    defaults = base.get_config().tokenizer
    assert (defaults.trainer, defaults.train_bytes) == ("lmlab", 10_000_000)  # as the README says

    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"),
                         [f"data.data_dir={tmp_path / 'tfds'}", "tokenizer.trainer=tokenizers",
                          "tokenizer.train_bytes=20000", "tokenizer.vocab_size=400"])
    data = build.data_config(config, str(tmp_path))
    tokenizer = build.tokenizer(config, str(tmp_path), data)
    assert sorted(os.listdir(tmp_path / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]
    assert isinstance(tokenizer, HFJsonTokenizer) and tokenizer.vocab_size == 400
    train_split = list(build.pipeline.open_split(data, "train"))
    sample = list(training.sample_documents(train_split, 20_000, seed=data.seed))
    expected = training.train_library_bpe(sample, 400, (build.EOS_TOKEN,))
    assert tokenizer.encode(train_split[0]) == expected.encode(train_split[0])
    # The whole split would learn other merges: the bound is what was trained on.
    whole = training.train_library_bpe(train_split, 400, (build.EOS_TOKEN,))
    assert whole.merges() != expected.merges()
    config.tokenizer.trainer = "sentencepiece"
    message = r"`tokenizer.trainer`='sentencepiece'; expected one of \('lmlab', 'tokenizers'\)"
    with pytest.raises(ValueError, match=message):
        build.tokenizer(config, str(tmp_path / "other"), data)
