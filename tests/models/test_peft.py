"""PEFT interop (`models/convert/peft.py`, `models.hf.load_pretrained(..., adapter=)`): adapters
that `peft` itself made (random nonzero B) load into lmlab with logits equal to
`peft.PeftModel.from_pretrained`'s, and adapters lmlab saves load in `peft` with lmlab's logits
(float32, 1e-5 relative plus the float32 rounding of the outputs' scale); bad adapters are
one-line errors naming the file and tensor."""

import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from models import hf
from models.convert.peft import load_adapter, save_adapter
from models.layers.peft import LoraConfig, PeftConfig

EPS32 = float(np.finfo(np.float32).eps)
IDS = (np.arange(2 * 10).reshape(2, 10) * 11 + 5) % 64


def _llama(**extra):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **extra))


BASES = {
    "llama": lambda: _llama(),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)),
    "bert": lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32), add_pooling_layer=True),
}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """family -> a saved transformers base model directory."""
    out = {}
    for family, make in BASES.items():
        torch.manual_seed(0)
        directory = str(tmp_path_factory.mktemp(family))
        make().save_pretrained(directory)
        out[family] = directory
    return out


def _fresh(family, directory):
    cls = type(BASES[family]())
    return cls.from_pretrained(directory).eval()


def _torch_out(model):
    with torch.no_grad():
        out = model(torch.as_tensor(IDS))
    if hasattr(out, "logits"):
        return out.logits.numpy()
    return np.concatenate([out.last_hidden_state.numpy().reshape(-1), out.pooler_output.numpy().reshape(-1)])


def _lmlab_out(model, params):
    out = model.apply({"params": params}, jnp.asarray(IDS))
    if isinstance(out, tuple):
        return np.concatenate([np.asarray(o).reshape(-1) for o in out])
    return np.asarray(out)


def _assert_close(got, want):
    # 1e-5 relative, plus float32 rounding of the outputs' scale through 2 layers of width <= 128
    # (a few eps per matmul, ~10 matmuls): the two frameworks sum in different orders.
    atol = 4 * EPS32 * math.sqrt(128) * 10 * float(np.max(np.abs(want)))
    err = np.abs(got - want) - 1e-5 * np.abs(want)
    print(f"parity: max |lmlab - peft| / max |peft| = {np.max(np.abs(got - want)) / np.max(np.abs(want)):.2e}")
    assert np.max(err) <= atol, f"worst excess {np.max(err):.3g} over atol {atol:.3g}"


def _randomize_torch(model, seed=0):
    """peft's B (and embedding A) start at zero: make them nonzero, and move DoRA's magnitudes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


PEFT_MADE = [
    ("llama", {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8}),
    ("llama", {"target_modules": "all-linear", "r": 8, "lora_alpha": 16, "use_rslora": True}),
    ("llama", {"target_modules": ["q_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"], "r": 4,
               "lora_alpha": 6, "use_dora": True}),
    ("qwen2", {"target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj"], "r": 2, "lora_alpha": 5,
               "use_dora": True}),
    ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc", "wte"], "r": 4, "lora_alpha": 8,
              "fan_in_fan_out": True}),
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "r": 4, "lora_alpha": 8, "fan_in_fan_out": True,
              "use_dora": True}),
    ("bert", {"target_modules": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                 "word_embeddings"], "r": 4, "lora_alpha": 8, "use_dora": True}),
]


@pytest.mark.parametrize("family,lora", PEFT_MADE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(PEFT_MADE)])
def test_peft_made_adapter_loads_with_peft_logits(family, lora, base_dirs, tmp_path):
    directory = base_dirs[family]
    torch.manual_seed(1)
    made = peft.get_peft_model(_fresh(family, directory), peft.LoraConfig(**lora))
    _randomize_torch(made)
    made.save_pretrained(str(tmp_path))
    want = _torch_out(peft.PeftModel.from_pretrained(_fresh(family, directory), str(tmp_path)).eval())
    model, params = hf.load_pretrained(directory, adapter=str(tmp_path))
    got = _lmlab_out(model, params)
    _assert_close(got, want)
    base_model, base_params = hf.load_pretrained(directory)
    assert np.max(np.abs(_lmlab_out(base_model, base_params) - want)) > 1e-2 * np.max(np.abs(want))  # LoRA counts
    if lora.get("use_dora") and family == "llama":  # the stacked layout of scan_layers takes the same adapter
        scanned, scanned_params = hf.load_pretrained(directory, adapter=str(tmp_path), scan_layers=True)
        _assert_close(_lmlab_out(scanned, scanned_params), want)
    lora_cfg = model.config.block.lora
    assert (lora_cfg.rank, lora_cfg.alpha, lora_cfg.rslora, lora_cfg.dora) == (
        lora["r"], lora["lora_alpha"], lora.get("use_rslora", False), lora.get("use_dora", False))


LMLAB_MADE = [
    ("llama", {"targets": r"self_attention/(query|key|value|out)$|mlp/|embedding$|lm_head", "rank": 4,
               "alpha": 8.0, "dora": True}),
    ("llama", {"targets": r"layer_1/self_attention/(query|value)$", "rank": 2, "alpha": 3.0, "rslora": True}),
    ("gpt2", {"targets": r"self_attention/out$|mlp/|embedding$", "rank": 4, "alpha": 8.0}),
    ("bert", {"targets": r"self_attention/|mlp/wi$", "rank": 4, "alpha": 8.0, "dora": True}),
]


@pytest.mark.parametrize("family,lora", LMLAB_MADE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(LMLAB_MADE)])
def test_lmlab_made_adapter_loads_in_peft_with_lmlab_logits(family, lora, base_dirs, tmp_path):
    directory = base_dirs[family]
    base_model, base_params = hf.load_pretrained(directory)
    config = base_model.config
    model = base_model.clone(config=dataclasses.replace(config, block=dataclasses.replace(
        config.block, peft=PeftConfig(lora=LoraConfig(**lora)))))
    init = model.init(jax.random.key(0), jnp.asarray(IDS))["params"]
    rng = np.random.default_rng(2)

    def fill(path, x):
        name = str(path[-1].key)
        if name.endswith(("_lora_a", "_lora_b")):
            return jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32)
        if name.endswith("_lora_magnitude"):
            return x * jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        return _get(base_params, [p.key for p in path])

    params = jax.tree_util.tree_map_with_path(fill, nn.unbox(init))
    save_adapter(model, params, str(tmp_path), base_model_name_or_path=directory)
    want = _lmlab_out(model, params)
    got = _torch_out(peft.PeftModel.from_pretrained(_fresh(family, directory), str(tmp_path)).eval())
    _assert_close(got, want)
    # and back: lmlab reads what it wrote to the same outputs
    again_model, again = load_adapter(base_model, base_params, str(tmp_path))
    _assert_close(_lmlab_out(again_model, again), want)
    with pytest.raises(FileExistsError):
        save_adapter(model, params, str(tmp_path))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_bad_adapters_are_one_line_errors(base_dirs, tmp_path):
    made = peft.get_peft_model(_fresh("llama", base_dirs["llama"]), peft.LoraConfig(target_modules=["q_proj"], r=4))
    made.save_pretrained(str(tmp_path / "llama"))
    # Another architecture.
    qwen_model, qwen_params = hf.load_pretrained(base_dirs["qwen2"])
    with pytest.raises(ValueError, match=r"adapter_config.json is for a LlamaForCausalLM base.*Qwen2ForCausalLM"):
        load_adapter(qwen_model, qwen_params, str(tmp_path / "llama"))
    # Another width: the tensor is named.
    wider = str(tmp_path / "wider")
    torch.manual_seed(0)
    _llama(head_dim=16).save_pretrained(wider)
    model, params = hf.load_pretrained(wider)
    with pytest.raises(ValueError, match=r"tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' "
                                         r"has shape \(32, 4\).*expects \(64, 4\)") as e:
        load_adapter(model, params, str(tmp_path / "llama"))
    assert "\n" not in str(e.value)
    # Not an adapter directory / unsupported settings.
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(model, params, str(tmp_path))
    with open(tmp_path / "llama" / "adapter_config.json") as f:
        config = json.load(f)
    config["rank_pattern"] = {"q_proj": 8}
    os.makedirs(tmp_path / "pattern")
    with open(tmp_path / "pattern" / "adapter_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"adapter_config.json sets \{'rank_pattern'"):
        load_adapter(model, params, str(tmp_path / "pattern"))


def test_gpt2_fused_qkv_needs_one_shared_a(base_dirs, tmp_path):
    base_model, _ = hf.load_pretrained(base_dirs["gpt2"])
    config = base_model.config
    model = base_model.clone(config=dataclasses.replace(config, block=dataclasses.replace(
        config.block, peft=PeftConfig(lora=LoraConfig(targets="self_attention/query$", rank=4)))))
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(IDS))["params"])
    with pytest.raises(ValueError, match=r"GPT-2's fused transformer.h.0.attn.c_attn has one LoRA A"):
        save_adapter(model, params, str(tmp_path))
