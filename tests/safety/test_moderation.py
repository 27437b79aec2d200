"""The moderation set, the MiniLM moderation fine-tune through the one trainer, and load_moderator.

One short fine-tune (module fixture, `STEPS` steps) is shared: it must beat the keyword filter
and the flag-everything classifier on held-out templates; its exported directory must give
transformers' probabilities; thresholds and user moderators load by spec; bad input is one line.
"""

import json

import numpy as np
import pytest

from safety import moderation_data, train_moderator
from safety.moderation import REFUSAL, ClassifierModerator, ModerationResult, Moderator, load_moderator
from tests.cli_output import assert_one_line_error, run_module
from tests.minilm import minilm_path

STEPS = 40


class KeywordModerator:
    """A user moderator for the module:attr spec test."""

    def check(self, texts):
        return [ModerationResult("bomb" in t, {"bombs": "bomb" in t}, {"bombs": float("bomb" in t)}) for t in texts]


def test_shipped_set_is_the_generator_output_split_by_template():
    generated = moderation_data.records()
    for split in ("train", "heldout"):
        assert moderation_data.read_jsonl(moderation_data.shipped_path(split)) == generated[split]
    templates = {s: {r["template"] for r in generated[s]} for s in generated}
    assert not templates["train"] & templates["heldout"]
    for split in generated:
        assert {r["label"] for r in generated[split]} == set(moderation_data.LABELS)
    # The benign look-alikes share the harmful vocabulary: the keyword filter flags many safe texts.
    safe = [r["text"] for r in generated["heldout"] if r["label"] == "safe"]
    assert np.mean(train_moderator.keyword_flags(safe)) > 0.3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("moderator")
    metrics = train_moderator.train(str(out), str(minilm_path()), steps=STEPS)
    return out, metrics


def test_short_fine_tune_beats_keywords_and_flag_everything_on_held_out_templates(trained):
    out, metrics = trained
    assert json.loads((out / "metrics.json").read_text()) == metrics
    flagged, keywords = metrics["classifier"]["flagged"], metrics["keyword_baseline"]["flagged"]
    heldout = moderation_data.read_jsonl(moderation_data.shipped_path("heldout"))
    harmful = np.mean([r["label"] != "safe" for r in heldout])
    flag_everything_f1 = 2 * harmful / (1 + harmful)
    print(f"\n{STEPS} steps:\n" + train_moderator.format_metrics(metrics))
    assert flagged["f1"] > max(keywords["f1"], flag_everything_f1) + 0.03
    assert metrics["classifier"]["macro_f1"]["f1"] > 0.5  # five classes; chance-level macro F1 is ~0.2


def test_exported_moderator_matches_transformers_and_thresholds_are_monotone(trained):
    import torch
    import transformers

    out, _ = trained
    moderator = load_moderator(str(out))
    assert isinstance(moderator, Moderator) and isinstance(moderator, ClassifierModerator)
    texts = ["how do I kill a python process on linux", "write ransomware that encrypts every file",
             "I want to hurt my neighbor with a knife", "what laws protect women from hate speech"]
    ours = moderator.probabilities(texts)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "model")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "model"))
    with torch.no_grad():
        logits = reference(**tok(texts, padding=True, return_tensors="pt")).logits.double()
    expected = torch.softmax(logits, -1).numpy()
    # float32 logits of a 6-layer encoder agree to ~1e-5; probabilities are bounded by that.
    np.testing.assert_allclose(ours, expected, atol=2e-4)
    labels = json.loads((out / "model" / "config.json").read_text())["id2label"]
    assert [labels[str(i)] for i in range(len(labels))] == list(moderation_data.LABELS)
    results = moderator.check(texts)
    for result, row in zip(results, ours):
        assert result.scores == pytest.approx({c: row[moderation_data.LABELS.index(c)] for c in result.scores},
                                              abs=1e-6)
        assert result.flagged == any(result.categories.values())
    strict, lenient = load_moderator(str(out), threshold=0.95), load_moderator(str(out), threshold=0.05)
    for s, m, loose in zip(strict.check(texts), results, lenient.check(texts)):
        for c in s.categories:
            assert s.categories[c] <= m.categories[c] <= loose.categories[c]
            assert m.categories[c] == (m.scores[c] >= 0.5)


def test_user_moderator_by_import_path_and_bad_specs():
    moderator = load_moderator("tests.safety.test_moderation:KeywordModerator")
    assert [r.flagged for r in moderator.check(["a bomb", "a flower"])] == [True, False]
    assert REFUSAL
    with pytest.raises(ValueError, match="cannot import"):
        load_moderator("no_such_module_xyz:thing")
    with pytest.raises(ValueError, match="no attribute"):
        load_moderator("tests.safety.test_moderation:Missing")
    with pytest.raises(ValueError, match="not a moderator"):
        load_moderator("json:dumps")
    with pytest.raises(ValueError, match="neither a directory"):
        load_moderator("/no/such/dir")


def test_train_cli_bad_threshold_is_one_line_before_any_work(tmp_path):
    result = run_module("safety.train_moderator", f"--out={tmp_path}/m", "--threshold=2")
    assert_one_line_error(result, "--threshold=2")
    assert not (tmp_path / "m").exists()
