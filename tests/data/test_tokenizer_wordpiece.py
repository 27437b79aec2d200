"""BERT WordPiece through data.tokenizer (MiniLM's tokenizer.json, and its vocab.txt alone) against
transformers' BertTokenizerFast on the same files: ids, character offsets, [CLS]/[SEP]."""

import shutil
from pathlib import Path

import pytest
import tokenizers
import transformers

from data.tokenizer import load_tokenizer
from data.tokenizer.hf_json import HFJsonTokenizer
from tests.minilm import minilm_path

TEXTS = [
    "Hello world, unaffable!",
    "  Leading spaces, tabs\tand\nnewlines; CAPITALS and MiXeD case.",
    "Café déjà vu: naïve façade — 東京 and emoji 🙂 (unknown?)",
    "The Python `__init__` method's self-reference, e.g. x[0:3] == 'abc' (PEP 8).",
    "supercalifragilisticexpialidocious " * 3,
    "",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="module")
def vocab_only_dir(minilm_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vocab_only")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, directory / name)
    return directory


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt", "vocab_dir"])
def test_wordpiece_ids_and_offsets_equal_bert_tokenizer_fast(source, minilm_dir, vocab_only_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = {"tokenizer.json": minilm_dir, "vocab.txt": minilm_dir / "vocab.txt", "vocab_dir": vocab_only_dir}[source]
    ours = load_tokenizer(path)
    assert isinstance(ours, HFJsonTokenizer)
    reference = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir if source == "tokenizer.json"
                                                                   else vocab_only_dir))
    for text in TEXTS:
        expected = reference(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = ours.encode_with_offsets(text)
        assert ids == expected["input_ids"] == ours.encode(text), text
        assert offsets == [tuple(o) for o in expected["offset_mapping"]], text
    assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id) == (
        reference.cls_token_id, reference.sep_token_id, reference.pad_token_id, reference.mask_token_id)
    assert ours.vocab_size == len(reference)


def test_tokenizer_json_padding_is_not_applied_by_encode_but_is_saved(minilm_dir, tmp_path):
    """MiniLM's tokenizer.json pads every text to 128 tokens; encode returns the text's tokens only,
    and save keeps the file's padding/truncation settings."""
    ours = load_tokenizer(minilm_dir)
    assert len(ours.encode("two words")) == 2
    assert len(ours.encode("word " * 300)) == 300
    ours.save(tmp_path)
    original = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert saved.padding == original.padding and saved.truncation == original.truncation
    assert len(saved.encode("two words").ids) == 128
    assert load_tokenizer(tmp_path).encode("two words") == ours.encode("two words")
