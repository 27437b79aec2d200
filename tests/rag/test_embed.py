"""rag.embed.Embedder against sentence-transformers on the real all-MiniLM-L6-v2 directory, and the
recipe read from the directory's own files (a copy with [CLS] pooling, no Normalize and a short
max_seq_length must still match sentence-transformers loading that copy)."""

import json
import os
import shutil

import numpy as np
import pytest
from pydoc_data.topics import topics

from rag.embed import Embedder, read_recipe
from tests.minilm import minilm_path

TOL = 1e-5  # the bound; float32 sums over 384 dims of unit vectors differ by ~1e-7

TEXTS = ["hello world", "  The quick brown fox jumps over the lazy dog.  ", "", "x",
         "Ünïcödé façade — naïve café, 東京.", " ".join(["truncated"] * 400)]
TEXTS += [text[:2500] for text in list(topics.values())[:14]]  # paragraphs, several > 256 tokens


@pytest.fixture(scope="module")
def embedder():
    return Embedder.load(minilm_path())


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu")


def test_equals_sentence_transformers_on_mixed_lengths(embedder, reference):
    ours = embedder.encode(TEXTS, batch_size=8)
    theirs = reference.encode(TEXTS, batch_size=8, convert_to_numpy=True)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < TOL
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    assert max(len(embedder.token_ids(t)) for t in TEXTS) == embedder.max_tokens == 256  # some were truncated


def test_batch_composition_does_not_change_embeddings(embedder):
    together = embedder.encode(TEXTS[:8], batch_size=8)
    alone = np.concatenate([embedder.encode([t]) for t in TEXTS[:8:3]])
    np.testing.assert_allclose(alone, together[::3], atol=TOL)


def test_recipe_comes_from_the_directory(tmp_path, embedder):
    from sentence_transformers import SentenceTransformer

    src, copy = minilm_path(), tmp_path / "minilm_cls"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(src / "model.safetensors", copy / "model.safetensors")
    pooling = json.loads((copy / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = [m for m in json.loads((copy / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (copy / "modules.json").write_text(json.dumps(modules))
    (copy / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    assert read_recipe(copy) == {"pooling": "cls", "normalize": False, "max_seq_length": 24, "do_lower_case": False}

    variant = Embedder.load(copy)
    texts = TEXTS[:2] + TEXTS[6:9]
    ours = variant.encode(texts)
    theirs = SentenceTransformer(str(copy), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(ours - theirs).max() < TOL * np.abs(theirs).max()
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-3)  # not normalized this time
    assert Embedder.load(src, max_tokens=24).max_tokens == 24


def test_bad_directories_get_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Embedder.load(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.CLIPModel"}]))
    with pytest.raises(ValueError, match="not a Transformer"):
        read_recipe(tmp_path)


def test_single_string_is_refused(embedder):
    with pytest.raises(TypeError, match="not a single str"):
        embedder.encode("one text")
