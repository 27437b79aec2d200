"""models.hf: Hugging Face directories in and out, checked against transformers on torch."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import hf
from models.bert import BertForQuestionAnswering

VOCAB = 61
IDS = np.random.default_rng(0).integers(1, VOCAB, size=(2, 10))

CONFIGS = {
    "LlamaForCausalLM": (transformers.LlamaConfig, dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16})),
    "Qwen2ForCausalLM": (transformers.Qwen2Config, dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True)),
    "Qwen3ForCausalLM": (transformers.Qwen3Config, dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, tie_word_embeddings=False)),
    "GPT2LMHeadModel": (transformers.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    "BertModel": (transformers.BertConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=48, max_position_embeddings=32)),
    "BertForMaskedLM": (transformers.BertConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=48, max_position_embeddings=32)),
    "BertForSequenceClassification": (transformers.BertConfig, dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
        id2label={0: "neg", 1: "neutral", 2: "pos"}, problem_type="single_label_classification")),
    "BertForQuestionAnswering": (transformers.BertConfig, dict(hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=48,
                                                               max_position_embeddings=32)),
}


def _hf_model(arch):
    config_cls, kw = CONFIGS[arch]
    config = config_cls(vocab_size=VOCAB, attn_implementation="eager", **kw)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # move norms and biases off their 1 / 0 initial values
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _first_output(model):
    with torch.no_grad():
        out = model(torch.tensor(IDS))
    if hasattr(out, "start_logits"):  # question answering: start and end, stacked
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()])
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _ours(model, params):
    out = model.apply({"params": params}, jnp.asarray(IDS, jnp.int32))
    if isinstance(model, BertForQuestionAnswering):
        return np.stack([np.asarray(out[0]), np.asarray(out[1])])
    return np.asarray(out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize("arch", CONFIGS)
def test_load_pretrained_matches_transformers_hf_torch(arch, tmp_path):
    reference = _hf_model(arch)
    # Small shards, so that the sharded index path is read.
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / hf.INDEX).exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    model, params = hf.load_pretrained(str(tmp_path))
    expected = _first_output(reference)
    np.testing.assert_allclose(_ours(model, params), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("arch", CONFIGS)
def test_save_pretrained_loads_in_transformers_hf_torch(arch, tmp_path):
    reference = _hf_model(arch)
    reference.save_pretrained(tmp_path / "in", safe_serialization=True)
    model, params = hf.load_pretrained(str(tmp_path / "in"))
    hf.save_pretrained(model, params, str(tmp_path / "out"))
    reloaded = getattr(transformers, arch).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_allclose(_first_output(reloaded), _first_output(reference), rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_and_missing_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*T5ForConditionalGeneration.*LlamaForCausalLM"):
        hf.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        hf.load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_pretrained(str(tmp_path / "nothing"))


def test_missing_tensor_is_named(tmp_path):
    reference = _hf_model("LlamaForCausalLM")
    state = {k: v for k, v in reference.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    reference.save_pretrained(tmp_path, state_dict=state, safe_serialization=True)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        hf.load_pretrained(str(tmp_path))


def test_save_pretrained_never_overwrites(tmp_path):
    reference = _hf_model("Qwen2ForCausalLM")
    reference.save_pretrained(tmp_path / "in", safe_serialization=True)
    model, params = hf.load_pretrained(str(tmp_path / "in"))
    hf.save_pretrained(model, params, str(tmp_path / "out"))
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds"):
        hf.save_pretrained(model, params, str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel", "BertForMaskedLM"])
def test_scan_layers_load_and_save_hf_torch(arch, tmp_path):
    """scan_layers=True loads stacked params with the same outputs, and saves back per layer."""
    reference = _hf_model(arch)
    reference.save_pretrained(tmp_path / "in", safe_serialization=True)
    model, params = hf.load_pretrained(str(tmp_path / "in"), scan_layers=True)
    layers = params.get("bert", params)
    assert model.config.scan_layers and "layers" in layers and "layer_0" not in layers
    expected = _first_output(reference)
    np.testing.assert_allclose(_ours(model, params), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    hf.save_pretrained(model, params, str(tmp_path / "out"))
    reloaded = getattr(transformers, arch).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_allclose(_first_output(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_bert_refuses_decoder_overrides_hf_torch(tmp_path):
    _hf_model("BertModel").save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match=r"BertModel takes the overrides remat and scan_layers only; got \['mtp_depth'\]"):
        hf.load_pretrained(str(tmp_path), mtp_depth=1)
