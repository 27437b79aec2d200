"""models.hf's BERT task heads (sequence classification, question answering) against transformers
on torch: padded two-segment batches, label maps, and a plain encoder (the real all-MiniLM-L6-v2)
loaded under a freshly initialized head."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import hf
from models.bert import BertForQuestionAnswering, BertForSequenceClassification
from tests.minilm import minilm_path
from tests.torch_reference import assert_same_logits, assert_same_state_dict

VOCAB, D, LAYERS, FF = 61, 32, 2, 48
EPS32 = float(np.finfo(np.float32).eps)
LABELS = {0: "neg", 1: "neutral", 2: "pos"}


def _tolerance(reference: np.ndarray, width: int = FF, layers: int = LAYERS) -> float:
    """float32 rounding of L post-LN layers of dot products of length <= width: a few eps per
    reduction, growing as sqrt(width), accumulating over the layers (+1: embeddings and head)."""
    return 16 * EPS32 * np.sqrt(width) * (layers + 1) * float(np.max(np.abs(reference)))


def _hf_model(arch: str, **extra):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=FF, max_position_embeddings=32, attn_implementation="eager",
                                     **extra)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # biases and norms off 0 / 1, heads large enough to matter
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif name.startswith(("classifier", "qa_outputs")):
                p.copy_(torch.randn_like(p) / D**0.5)
    return model


def _padded_batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, size=(3, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 6:] = 1
    types[1, 3:7] = 1
    return ids, mask, types


def _hf_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        out = model(*(torch.tensor(a) for a in batch))
    if hasattr(out, "start_logits"):
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()])
    return out.logits.numpy()


def _our_logits(model, params, batch) -> np.ndarray:
    out = model.apply({"params": params}, *(jnp.asarray(a, jnp.int32) for a in batch))
    return np.stack([np.asarray(o) for o in out]) if isinstance(out, tuple) else np.asarray(out)


@pytest.mark.parametrize("arch, extra", [
    ("BertForSequenceClassification", dict(id2label=LABELS)),
    ("BertForQuestionAnswering", {}),
])
def test_task_heads_match_transformers_on_padded_batches_hf_torch(arch, extra, tmp_path):
    reference = _hf_model(arch, **extra)
    reference.save_pretrained(tmp_path / "in")
    model, params = hf.load_pretrained(str(tmp_path / "in"))
    if arch == "BertForSequenceClassification":
        assert isinstance(model, BertForSequenceClassification) and model.num_labels == 3
    batch = _padded_batch()
    expected = _hf_logits(reference, batch)
    ours = _our_logits(model, params, batch)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=_tolerance(expected))

    hf.save_pretrained(model, params, str(tmp_path / "out"), **({"id2label": LABELS} if extra else {}))
    reloaded = getattr(transformers, arch).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert_same_state_dict(reloaded, reference)
    assert_same_logits(_hf_logits(reloaded, batch), expected)
    if extra:
        assert reloaded.config.id2label == LABELS and reloaded.config.problem_type == "single_label_classification"


@pytest.mark.parametrize("head", ["classification", "qa"])
def test_base_directory_loads_under_a_fresh_head_hf_torch(head, tmp_path):
    """The encoder's tensors are the checkpoint's; the head is new (normal(0, 0.02), zero bias);
    with that head copied into transformers' own fresh model the logits agree."""
    base = _hf_model("BertModel")
    base.save_pretrained(tmp_path)
    _, base_params = hf.load_pretrained(str(tmp_path))
    model, params = hf.load_pretrained(str(tmp_path), head=head, num_labels=4 if head == "classification" else None)
    name = "classifier" if head == "classification" else "qa_outputs"
    assert params[name]["kernel"].shape == (D, 4 if head == "classification" else 2)
    assert not params[name]["bias"].any() and 0.01 < params[name]["kernel"].std() < 0.04
    encoder = {k: v for k, v in base_params.items() if head == "classification" or k != "pooler"}
    np.testing.assert_equal(params["bert"], encoder)

    arch = "BertForSequenceClassification" if head == "classification" else "BertForQuestionAnswering"
    reference = getattr(transformers, arch).from_pretrained(tmp_path, num_labels=params[name]["kernel"].shape[1],
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        getattr(reference, name).weight.copy_(torch.tensor(params[name]["kernel"].T))
        getattr(reference, name).bias.copy_(torch.tensor(params[name]["bias"]))
    expected = _hf_logits(reference, _padded_batch())
    np.testing.assert_allclose(_our_logits(model, params, _padded_batch()), expected, rtol=0,
                               atol=_tolerance(expected))


def test_minilm_real_weights_under_a_classification_head_hf_torch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = minilm_path()
    model, params = hf.load_pretrained(str(directory), head="classification", num_labels=2, seed=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    enc = tokenizer(["A man is eating food.", "Stocks fell sharply on Monday, the worst day in years."],
                    ["He eats.", "Markets dropped."], padding=True, return_tensors="np")
    batch = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert (batch[1] == 0).any() and (batch[2] == 1).any()
    reference = transformers.BertForSequenceClassification.from_pretrained(str(directory), num_labels=2).eval()
    with torch.no_grad():
        reference.classifier.weight.copy_(torch.tensor(params["classifier"]["kernel"].T))
        reference.classifier.bias.copy_(torch.tensor(params["classifier"]["bias"]))
    expected = _hf_logits(reference, batch)
    # The classifier reads the pooled [CLS] (width 384, 6 layers, intermediate 1536).
    np.testing.assert_allclose(_our_logits(model, params, batch), expected, rtol=0,
                               atol=_tolerance(expected, width=1536, layers=6))


def test_label_count_and_problem_type_errors_are_named(tmp_path):
    _hf_model("BertForSequenceClassification", id2label=LABELS).save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match=r"classifier of 3 labels, not num_labels=2"):
        hf.load_pretrained(str(tmp_path / "three"), num_labels=2)
    _, params = hf.load_pretrained(str(tmp_path / "three"), head="base")  # the classifier is dropped
    assert "classifier" not in params and "pooler" in params
    multi = tmp_path / "multi"
    _hf_model("BertForSequenceClassification", num_labels=4,
              problem_type="multi_label_classification").save_pretrained(multi)
    with pytest.raises(ValueError, match=r"problem_type='multi_label_classification'.*single-label"):
        hf.load_pretrained(str(multi))
    with pytest.raises(ValueError, match=r"head='ner'; expected one of"):
        hf.load_pretrained(str(tmp_path / "three"), head="ner")
    config = json.loads((tmp_path / "three" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    model, params = hf.load_pretrained(str(tmp_path / "three"))
    with pytest.raises(ValueError, match=r"id2label has ids \[0, 1\]; the model has 3 labels"):
        hf.save_pretrained(model, params, str(tmp_path / "out"), id2label={0: "a", 1: "b"})
    assert not (tmp_path / "out" / "config.json").exists()
    qa_model = BertForQuestionAnswering(model.config)
    with pytest.raises(ValueError, match="id2label applies to BertForSequenceClassification"):
        hf.save_pretrained(qa_model, {}, str(tmp_path / "out2"), id2label=LABELS)
