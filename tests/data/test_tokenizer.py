"""data/tokenizer against independent references: Hugging Face `tokenizers` (its BPE trainer
and its BPE encoder) and `sentencepiece`, plus the round-trip invariants.

The corpus is the English text that CPython ships (pydoc topics, ~465 KB).
"""

import json
import pickle
import pydoc_data.topics

import pytest
import sentencepiece
import tokenizers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

# Under `--import-mode=importlib` the repository root is not importable unless lmlab
# is pip-installed; let the suite run from a bare checkout too.

from data.tokenizer import ByteLevelBPE, Tokenizer, load_tokenizer
from data.tokenizer.bpe import bytes_to_unicode, str_to_token, token_to_str
from data.tokenizer.hf_json import HFJsonTokenizer, export_bpe
from data.tokenizer.spm import SentencePieceTokenizer

EOT = "<|endoftext|>"
_CORPUS = "\n\n".join(pydoc_data.topics.topics.values())
_SPLIT = int(0.9 * len(_CORPUS))
TRAIN_TEXT, HELD_OUT_TEXT = _CORPUS[:_SPLIT], _CORPUS[_SPLIT:]
# Strings that break naive tokenizers: multi-byte UTF-8, combining marks, ZWJ sequences,
# whitespace runs, NUL, lone continuation-looking Latin-1, and the special token itself.
TRICKY_TEXTS = [
    "",
    " ",
    "\x00",
    "a\x00\x00b",
    "   \t\t\n\n\r\n   x  ",
    "héllo wörld",
    "e\u0301\u0302 n\u0303",
    "日本語のテキスト、中文字符",
    "😀👍🏽 👩‍👩‍👧‍👦 🇫🇷",
    "ÿþ\x80\x7f",
    "don't we'll they've I'm",
    f"before{EOT}after",
]

hypothesis_settings = settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _bytes_per_token(tokenizer_encode, text):
    return len(text.encode("utf-8")) / len(tokenizer_encode(text))


def _train_hf_bpe(text, vocab_size):
    """The `tokenizers` library's byte-level BPE, set up as GPT-2's."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


@pytest.fixture(scope="module")
def small_bpe():
    # Unicode beyond the (ASCII) corpus, so that some multi-byte merges exist.
    return ByteLevelBPE.train([TRAIN_TEXT[:100_000], "日本語 中文 😀😀 café naïve " * 20], vocab_size=512)


@pytest.fixture(scope="module")
def bpe_1024():
    return ByteLevelBPE.train(TRAIN_TEXT, vocab_size=1024)


@pytest.fixture(scope="module")
def hf_bpe_1024():
    return _train_hf_bpe(TRAIN_TEXT, 1024)


# --- byte-level BPE: invariants -------------------------------------------------------


@hypothesis_settings
@given(text=st.text())
@example(text="".join(TRICKY_TEXTS))
def test_encode_decode_is_identity(small_bpe, text):
    for allowed_special in ((), "all"):
        ids = small_bpe.encode(text, allowed_special=allowed_special)
        assert all(0 <= i < small_bpe.vocab_size for i in ids)
        assert small_bpe.decode(ids) == text


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tricky_texts_round_trip(small_bpe, text):
    assert small_bpe.decode(small_bpe.encode(text)) == text
    assert small_bpe.encode_batch([text, text]) == [small_bpe.encode(text)] * 2


def test_encode_merges_common_words(small_bpe):
    # One token per character would mean no merge is applied at encode time.
    text = " the function returns"
    assert len(small_bpe.encode(text)) < len(text) / 2


def test_decode_of_invalid_utf8_replaces(small_bpe):
    byte_id = {small_bpe.token_bytes(i): i for i in range(256)}
    assert small_bpe.decode([byte_id[b"\xff"]]) == "\ufffd"
    # The first two bytes of a 4-byte emoji, then 'a'.
    partial = [byte_id[b] for b in (b"\xf0", b"\x9f", b"a")]
    assert small_bpe.decode(partial).endswith("a") and "\ufffd" in small_bpe.decode(partial)


def test_decode_rejects_out_of_range_ids(small_bpe):
    with pytest.raises(ValueError, match=r"token id 512 is out of range"):
        small_bpe.decode([1, 512])
    with pytest.raises(ValueError, match=r"token id -1 is out of range"):
        small_bpe.decode([-1])


def test_special_tokens_are_recognized_only_when_allowed(small_bpe):
    eot = small_bpe.special_tokens[EOT]
    assert eot == small_bpe.vocab_size - 1
    assert small_bpe.eos_id == small_bpe.bos_id == eot and small_bpe.pad_id is None
    text = f"a{EOT}b{EOT}"
    assert small_bpe.encode(text, allowed_special="all").count(eot) == 2
    assert small_bpe.encode(text, allowed_special={EOT}).count(eot) == 2
    assert eot not in small_bpe.encode(text)
    assert small_bpe.decode(small_bpe.encode(text, allowed_special="all")) == text
    with pytest.raises(ValueError, match=r"<\|pad\|>"):
        small_bpe.encode(text, allowed_special={"<|pad|>"})


def test_training_does_not_learn_merges_across_special_tokens():
    bpe = ByteLevelBPE.train([f"xy{EOT}" * 50], vocab_size=300)
    learned = {bpe.token_bytes(i) for i in range(256, bpe.vocab_size - 1)}
    assert b"xy" in learned
    assert not any(b"<|" in t or b"|>" in t for t in learned), learned


def test_train_rejects_a_vocab_without_room_for_bytes():
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small.*257"):
        ByteLevelBPE.train("abc", vocab_size=200)


def test_gpt2_byte_alphabet_is_a_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"  # GPT-2's well-known names.
    every_byte = bytes(range(256))
    assert str_to_token(token_to_str(every_byte)) == every_byte


def test_save_load_round_trip(small_bpe, tmp_path):
    small_bpe.save(tmp_path / "bpe")
    for loaded in (
        ByteLevelBPE.load(tmp_path / "bpe"),
        load_tokenizer(tmp_path / "bpe"),
        load_tokenizer(tmp_path / "bpe" / "bpe.json"),
    ):
        assert isinstance(loaded, ByteLevelBPE)
        assert loaded.vocab_size == small_bpe.vocab_size
        assert loaded.special_tokens == small_bpe.special_tokens
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (small_bpe.bos_id, small_bpe.eos_id, small_bpe.pad_id)
        for text in [HELD_OUT_TEXT[:20_000], *TRICKY_TEXTS]:
            assert loaded.encode(text, allowed_special="all") == small_bpe.encode(text, allowed_special="all")


# --- byte-level BPE against the `tokenizers` library ------------------------------------


def test_compresses_held_out_text(bpe_1024):
    # Measured 2.92 bytes/token at vocab 1024 (1.0 means no merges apply).
    assert bpe_1024.vocab_size == 1024
    assert _bytes_per_token(bpe_1024.encode, HELD_OUT_TEXT) > 2.8


def test_compression_matches_tokenizers_library(bpe_1024, hf_bpe_1024):
    ours = _bytes_per_token(bpe_1024.encode, HELD_OUT_TEXT)
    theirs = _bytes_per_token(lambda t: hf_bpe_1024.encode(t).ids, HELD_OUT_TEXT)
    assert abs(ours / theirs - 1) < 0.10, (ours, theirs)


def test_trainer_learns_the_same_merges_as_tokenizers_library(bpe_1024, hf_bpe_1024):
    # Same counts, same tie-breaking: the merge lists agree one for one, not just in size.
    theirs = [tuple(m) for m in json.loads(hf_bpe_1024.to_str())["model"]["merges"]]
    assert bpe_1024.merges() == theirs


@pytest.fixture(scope="module")
def exported_small_bpe(small_bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "tokenizer.json"
    export_bpe(small_bpe, path)
    return tokenizers.Tokenizer.from_file(str(path))


@hypothesis_settings
@given(text=st.text())
@example(text="".join(TRICKY_TEXTS))
@example(text=HELD_OUT_TEXT[:20_000])
def test_tokenizers_library_encodes_our_merges_identically(small_bpe, exported_small_bpe, text):
    assert exported_small_bpe.encode(text).ids == small_bpe.encode(text, allowed_special="all")


# --- Hugging Face tokenizer.json -------------------------------------------------------


@pytest.fixture(scope="module")
def hf_json_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    _train_hf_bpe(TRAIN_TEXT[:100_000], 600).save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def hf_json_and_reference(hf_json_dir):
    return load_tokenizer(hf_json_dir), tokenizers.Tokenizer.from_file(str(hf_json_dir / "tokenizer.json"))


@hypothesis_settings
@given(text=st.text())
@example(text="".join(TRICKY_TEXTS))
def test_hf_json_loader_round_trips(hf_json_and_reference, text):
    tokenizer, reference = hf_json_and_reference
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_hf_json_loader_interface(hf_json_dir, tmp_path):
    for source in (hf_json_dir, hf_json_dir / "tokenizer.json", f"hf:{hf_json_dir}"):
        tokenizer = load_tokenizer(source)
        assert isinstance(tokenizer, HFJsonTokenizer)
        assert tokenizer.vocab_size == 600
        assert tokenizer.eos_id == tokenizer.bos_id == 0 and tokenizer.pad_id is None  # Trainer puts EOT first.
        texts = [HELD_OUT_TEXT[:2000], "héllo 😀"]
        assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    tokenizer.save(tmp_path / "saved")
    reloaded = load_tokenizer(tmp_path / "saved")
    assert reloaded.encode(HELD_OUT_TEXT[:5000]) == tokenizer.encode(HELD_OUT_TEXT[:5000])
    assert reloaded.eos_id == tokenizer.eos_id


def test_hf_json_roles_come_from_tokenizer_config(hf_json_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_json_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOT}, "bos_token": None}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_id == 0 and tokenizer.bos_id is None


def test_mask_token_role_is_inferred_saved_and_exported(small_bpe, tmp_path):
    """A [MASK] special token (masked-LM training) gets the mask role, kept by save/load and
    found again by the HF loader; tokenizers without one, and older bpe.json files whose
    roles predate the mask role, say None."""
    bpe = ByteLevelBPE.train(TRAIN_TEXT[:20_000], vocab_size=300, special_tokens=(EOT, "[MASK]"))
    assert bpe.mask_id == bpe.special_tokens["[MASK]"] == 299 and bpe.eos_id == 298
    assert 299 in bpe.encode("a [MASK] b", allowed_special="all") and 299 not in bpe.encode("a [MASK] b")
    bpe.save(tmp_path / "bpe")
    assert load_tokenizer(tmp_path / "bpe").mask_id == 299
    (tmp_path / "hf").mkdir()
    export_bpe(bpe, tmp_path / "hf" / "tokenizer.json")
    assert load_tokenizer(tmp_path / "hf").mask_id == 299
    assert small_bpe.mask_id is None
    content = json.loads((tmp_path / "bpe" / "bpe.json").read_text())
    del content["roles"]["mask"]
    (tmp_path / "bpe" / "bpe.json").write_text(json.dumps(content))
    old = load_tokenizer(tmp_path / "bpe")
    assert old.mask_id is None and old.eos_id == 298


# --- SentencePiece ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm_model_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    # Identity normalization, kept whitespace and byte fallback make SentencePiece lossless.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT[:60_000].split("\n")),
        model_prefix=str(directory / "m"),
        vocab_size=600,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return directory / "m.model"


def test_sentencepiece_loader(spm_model_path, tmp_path):
    reference = sentencepiece.SentencePieceProcessor(model_file=str(spm_model_path))
    tokenizer = load_tokenizer(spm_model_path)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.vocab_size == 600
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    texts = [HELD_OUT_TEXT[:3000], *TRICKY_TEXTS[:-1]]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([600])
    tokenizer.save(tmp_path / "saved")
    reloaded = load_tokenizer(tmp_path / "saved")
    assert reloaded.encode(texts[0]) == tokenizer.encode(texts[0])


# --- load_tokenizer dispatch and errors -------------------------------------------------


def test_load_tokenizer_dispatches_on_format(small_bpe, hf_json_dir, spm_model_path, tmp_path):
    small_bpe.save(tmp_path / "ours")
    assert isinstance(load_tokenizer(tmp_path / "ours"), ByteLevelBPE)
    assert isinstance(load_tokenizer(str(hf_json_dir)), HFJsonTokenizer)
    assert isinstance(load_tokenizer(spm_model_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(spm_model_path.parent), SentencePieceTokenizer)  # Its only .model.
    assert isinstance(load_tokenizer(f"bpe:{tmp_path / 'ours'}"), ByteLevelBPE)
    for loaded in (load_tokenizer(tmp_path / "ours"), load_tokenizer(hf_json_dir), load_tokenizer(spm_model_path)):
        assert isinstance(loaded, Tokenizer)
        # Data-loader workers receive tokenizers by pickling.
        text = HELD_OUT_TEXT[:1000]
        assert pickle.loads(pickle.dumps(loaded)).encode(text) == loaded.encode(text)


def test_load_tokenizer_errors_name_the_path_and_formats(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*tokenizer\.json.*\.model"):
        load_tokenizer(missing)
    with pytest.raises(ValueError, match=rf"{tmp_path}.*holds no tokenizer.*tokenizer\.json"):
        load_tokenizer(tmp_path)
    unknown = tmp_path / "vocab.bin"
    unknown.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"vocab\.bin has an unknown format.*bpe\.json.*tokenizer\.json.*\.model"):
        load_tokenizer(unknown)
    no_unk = tmp_path / "vocab.txt"  # a BERT WordPiece vocabulary must hold its unknown token
    no_unk.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"vocab\.txt.*has no unknown token '\[UNK\]'"):
        load_tokenizer(no_unk)
    other_json = tmp_path / "config.json"
    other_json.write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match=r"config\.json is neither"):
        load_tokenizer(other_json)
    broken_hf = tmp_path / "tokenizer.json"
    broken_hf.write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(ValueError, match=r"could not load .*tokenizer\.json as a Hugging Face"):
        load_tokenizer(broken_hf)
    broken_spm = tmp_path / "bad.model"
    broken_spm.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match=r"could not load .*bad\.model as a SentencePiece"):
        load_tokenizer(broken_spm)
