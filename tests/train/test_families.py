"""Every model family trains through the pretraining trainer: `configs/FAMILY.py:tiny`.

Each tiny preset runs a few steps on the embedded corpus; its training loss must fall from
the first logged step (about ln(vocab), an untrained model) to well below ln(vocab), and
the family's own metrics must be there: MoE auxiliary loss and routing statistics,
multi-token-prediction loss, and BERT's masked-LM evaluation instead of bits per byte.
"""

import json
import math
import os
import time

import pytest

from configs.loader import load_config
from train import build, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = ("gpt", "llama", "qwen", "bert", "moe", "deepseek")
STEPS = 20


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A data_dir and one BPE for every family: trained for bert, so it holds [MASK] too."""
    root = tmp_path_factory.mktemp("shared")
    config = load_config(os.path.join(REPO, "configs/bert.py:tiny"), [f"data.data_dir={root / 'tfds'}"])
    tokenizer = build.tokenizer(config, str(root), build.data_config(config, str(root)))
    assert tokenizer.mask_id is not None and tokenizer.eos_id is not None
    return [f"data.data_dir={root / 'tfds'}", f"tokenizer.path={root / 'tokenizer'}"]


def _run(shared, family, tmp_path):
    config = load_config(os.path.join(REPO, f"configs/{family}.py:tiny"), [
        *shared, f"steps={STEPS}", "logging.log_every_steps=1", "logging.progress_bar=false",
        "logging.peak_flops=1e11", "checkpoint.save_interval_steps=1000", "eval.num_samples=1"])
    start = time.time()
    summary = trainer.run(config, str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    curve = " ".join(f"{x['loss']:.2f}" for x in train)
    print(f"\n{family}: loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f} in {STEPS} steps ({curve}), "
          f"{time.time() - start:.1f} s (compile and evaluation included), "
          f"{summary['tokens_per_second']:.0f} tokens/s")
    return summary, train


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_trains_and_its_loss_falls(shared, family, tmp_path):
    summary, train = _run(shared, family, tmp_path)
    losses = [x["loss"] for x in train]
    ln_vocab = math.log(512)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    end = sum(losses[-3:]) / 3  # a masked LM scores ~75 tokens a step: noisy
    assert losses[0] > ln_vocab - 0.3, losses  # untrained: about uniform
    assert end < losses[0] - 0.4 and end < ln_vocab - 0.4, losses
    assert summary["final_step"] == STEPS and math.isfinite(summary["val_loss"])
    if family in ("moe", "deepseek"):
        for key in ("moe_aux_loss", "moe_dropped_fraction", "moe_load_max", "moe_load_min"):
            assert all(key in x and math.isfinite(x[key]) for x in train), key
        assert all(x["moe_load_min"] <= 1.0 <= x["moe_load_max"] for x in train)
        assert all(x["moe_aux_loss"] > 0 for x in train)
    else:
        assert not any(k.startswith("moe_") for k in train[-1])
    if family == "deepseek":
        mtp = [x["mtp_loss"] for x in train]
        assert all(math.isfinite(x) for x in mtp) and sum(mtp[-3:]) / 3 < mtp[0] - 0.4, mtp
    else:
        assert "mtp_loss" not in train[-1]
    if family == "bert":
        assert "val_bits_per_byte" not in summary and "samples" not in summary
        assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["val_loss"] < ln_vocab
    else:
        assert math.isfinite(summary["val_bits_per_byte"]) and len(summary["samples"]) == 1


def test_bert_needs_a_tokenizer_with_a_mask_token(tmp_path):
    """A BPE trained for a decoder family has no [MASK]: bert says so before it trains."""
    root = tmp_path / "gpt"
    config = load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [f"data.data_dir={root / 'tfds'}"])
    tokenizer = build.tokenizer(config, str(root), build.data_config(config, str(root)))
    assert tokenizer.mask_id is None
    bert = load_config(os.path.join(REPO, "configs/bert.py:tiny"), [f"data.data_dir={root / 'tfds'}"])
    with pytest.raises(ValueError, match=r"model.family='bert' trains a masked LM, but the tokenizer has no mask"):
        build.mlm(bert, tokenizer)
