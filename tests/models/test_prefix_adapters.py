"""Prefix tuning and bottleneck adapters (models/layers/adapters.py): a fresh adapter leaves the
model exactly as it was; prefix attention equals a float64 NumPy reference with P extra keys and
values (GQA, RoPE on the tokens only, padding, packed segments, the MLP reparameterization);
gradients reach the PEFT parameters and causality holds; cached decoding equals a full
recompute with a prefix (contiguous and paged caches); dp, fsdp and tp on 8 simulated devices
give dp's forward; a base checkpoint's params are a subset of the PEFT model's; bad configs are
one-line errors naming the `finetune.*` key.

Axis letters: B batch, T length, S keys, P prefix length, D model width, N heads, K kv heads,
H head dim, V vocabulary.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from inference import generate
from inference.engine import Engine, Request
from models.bert import BertConfig, BertForMaskedLM
from models.gpt import GPT, GPTConfig, llama_config, scan_params
from models.layers.adapters import PREFIX_MLP, fold_prefix
from models.layers.blocks import BlockConfig
from models.layers.feedforward import ACTIVATIONS
from models.layers.multihead import MultiHeadAttention
from models.layers.peft import (
    ADAPTER_ACTIVATIONS,
    AdapterConfig,
    PeftConfig,
    PrefixConfig,
    adapter_params,
    is_peft_path,
    prefix_params,
)
from models.layers.positional import RopeConfig
from sharding import mesh as mesh_lib
from sharding.layout import param_shardings
from sharding.strategies import get_strategy

EPS32 = float(np.finfo(np.float32).eps)
VOCAB = 40
LLAMA = llama_config(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_len=32)
GPT2 = GPTConfig(vocab_size=VOCAB, num_layers=2, max_len=32, block=BlockConfig(
    d_model=32, num_heads=4, d_ff=64, mlp_activation="gelu_tanh", norm_position="pre", dropout_rate=0.0))
BERT = BertConfig(vocab_size=VOCAB, num_layers=2, max_len=32, block=BlockConfig(
    d_model=32, num_heads=4, d_ff=64, mlp_activation="gelu", norm_eps=1e-12, dropout_rate=0.0))
PREFIX = PeftConfig(prefix=PrefixConfig(length=3))
PREFIX_MLP_CFG = PeftConfig(prefix=PrefixConfig(length=3, mlp_hidden=8))
HOULSBY = PeftConfig(adapter=AdapterConfig(hidden=4, kind="houlsby", activation="gelu"))
PARALLEL = PeftConfig(adapter=AdapterConfig(hidden=4, kind="parallel", scale=4.0))
EVERYTHING = PeftConfig(prefix=PrefixConfig(length=3, mlp_hidden=8), adapter=AdapterConfig(hidden=4))


def with_peft(config, peft):
    return dataclasses.replace(config, block=dataclasses.replace(config.block, peft=peft))


FAST_COMPILE = {"xla_backend_optimization_level": 0}


def init(model, ids):
    """The model's initial params (one compiled program rather than op-by-op dispatch)."""
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), ids)["params"])


def shapes(model, ids):
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])


def forward(model):
    """A jitted `model.apply({"params": p}, *args)`."""
    return jax.jit(lambda p, *args: model.apply({"params": p}, *args), compiler_options=FAST_COMPILE)


def randomize(params, seed=1, only_peft=False):
    """Every leaf (or every PEFT leaf) of params (or of their shapes) redrawn N(0, 0.3^2):
    nothing hides behind a zero init."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if only_peft and not is_peft_path("/".join(k.key for k in path)):
            return leaf
        return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, params)


def flat(params):
    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def random_ids(shape, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, size=shape).astype(np.int32)


# --- a fresh adapter is the base model; base checkpoints load ---------------------------

@pytest.mark.parametrize("peft", [HOULSBY, PARALLEL], ids=["houlsby", "parallel"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_fresh_adapters_give_the_base_logits_exactly_and_base_params_are_a_subset(family, peft):
    ids = random_ids((2, 7))
    if family == "bert":
        base, adapted = BertForMaskedLM(BERT), BertForMaskedLM(with_peft(BERT, peft))
    else:
        config = LLAMA if family == "llama" else GPT2
        base, adapted = GPT(config), GPT(with_peft(config, peft))
    base_params = randomize(shapes(base, ids))
    peft_params = init(adapted, ids)
    base_flat, peft_flat = flat(base_params), flat(peft_params)
    assert set(base_flat) < set(peft_flat)
    assert all(base_flat[k].shape == peft_flat[k].shape for k in base_flat)
    added = set(peft_flat) - set(base_flat)
    assert added and all(is_peft_path(k) for k in added)
    sites = {k.split("/adapter_")[0] for k in added}
    assert len(sites) == BERT.num_layers * (2 if peft.adapter.kind == "houlsby" else 1)
    # The base checkpoint's leaves dropped into the PEFT model's tree (the adapters as initialized).
    loaded = jax.tree_util.tree_map_with_path(
        lambda path, leaf: base_flat.get("/".join(k.key for k in path), leaf), peft_params)
    base_logits, run = forward(base)(base_params, ids), forward(adapted)
    np.testing.assert_array_equal(run(loaded, ids), base_logits)
    # ... and they do change it once trained.
    assert not np.allclose(run(randomize(loaded, only_peft=True), ids), base_logits)


def test_prefix_params_and_adapter_params_count_what_init_makes():
    ids = random_ids((1, 4))
    for peft in (PREFIX, PREFIX_MLP_CFG, HOULSBY, PARALLEL, EVERYTHING):
        params = flat(shapes(GPT(with_peft(LLAMA, peft)), ids))
        b = LLAMA.block
        want = 0
        if peft.prefix:
            want += prefix_params(peft.prefix, b.d_model, b.kv_heads, b.head_size)
        if peft.adapter:
            want += adapter_params(peft.adapter, b.d_model)
        got = sum(v.size for k, v in params.items() if is_peft_path(k))
        assert got == LLAMA.num_layers * want


def test_every_prefix_and_adapter_parameter_carries_logical_axis_names():
    for model in (GPT(with_peft(dataclasses.replace(LLAMA, scan_layers=True), EVERYTHING)),
                  BertForMaskedLM(with_peft(BERT, PeftConfig(prefix=PrefixConfig(2), adapter=AdapterConfig(
                      4, kind="parallel"))))):
        boxed = jax.eval_shape(model.init, jax.random.key(0), np.ones((1, 4), np.int32))["params"]
        leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        peft_leaves = [(jax.tree_util.keystr(p), leaf) for p, leaf in leaves if is_peft_path(
            "/".join(k.key for k in p))]
        assert peft_leaves
        for name, leaf in peft_leaves:
            assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, name
            assert set(leaf.names) <= {None, "layers", "embed", "mlp", "kv_heads", "head_dim"}, name


# --- prefix attention against float64 NumPy ---------------------------------------------

def _rope64(x_BTNH, positions_BT, theta=10000.0):
    H = x_BTNH.shape[-1]
    inv_freq = theta ** (-np.arange(0, H, 2, dtype=np.float64) / H)
    angles = positions_BT[..., None].astype(np.float64) * inv_freq  # [B, T, H/2]
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    x1, x2 = x_BTNH[..., : H // 2], x_BTNH[..., H // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _reference(p, x_BTD, positions_BT, valid_BT, segments_BT, P, mlp_hidden):
    """Causal GQA self-attention with RoPE on the tokens and P unrotated prefix keys/values
    that every query sees, in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x_BTD, np.float64)
    if mlp_hidden:
        hidden = np.tanh(p["prefix_embedding"] @ p["prefix_mlp_in"] + p["prefix_mlp_in_bias"])
        kv = np.einsum("PM,MCKH->PCKH", hidden, p["prefix_mlp_out"]) + p["prefix_mlp_out_bias"]
        pk, pv = kv[:, 0], kv[:, 1]
    else:
        pk, pv = p["prefix_key"], p["prefix_value"]
    q = _rope64(np.einsum("BTD,DNH->BTNH", x, p["query"]), positions_BT)
    k = _rope64(np.einsum("BTD,DKH->BTKH", x, p["key"]), positions_BT)
    v = np.einsum("BTD,DKH->BTKH", x, p["value"])
    B, T, N, H = q.shape
    K = k.shape[2]
    k = np.concatenate([np.broadcast_to(pk, (B, P, K, H)), k], axis=1)
    v = np.concatenate([np.broadcast_to(pv, (B, P, K, H)), v], axis=1)
    k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
    allowed = ((positions_BT[:, :, None] >= positions_BT[:, None, :]) & valid_BT[:, None, :]
               & (segments_BT[:, :, None] == segments_BT[:, None, :]))
    allowed = np.concatenate([np.ones((B, T, P), bool), allowed], axis=-1)[:, None]  # [B, 1, T, P + T]
    logits = np.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H)
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("BNTS,BSNH->BTNH", weights, v)
    return np.einsum("BTNH,NHD->BTD", out, p["out"])


@pytest.mark.parametrize("mlp_hidden", [0, 8])
def test_prefix_attention_equals_a_float64_reference_with_gqa_padding_and_segments(mlp_hidden):
    B, T, D, N, K, H, P = 2, 7, 16, 4, 2, 8, 3
    attn = MultiHeadAttention(num_heads=N, num_kv_heads=K, head_dim=H, rope=RopeConfig(),
                              prefix=PrefixConfig(length=P, mlp_hidden=mlp_hidden))
    rng = np.random.default_rng(0)
    x_BTD = rng.standard_normal((B, T, D)).astype(np.float32)
    # Row 0: two packed documents (positions restart); row 1: one document, its last 2 keys padding.
    segments = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]], np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]], np.int32)
    valid = segments != 0
    shapes = nn.unbox(jax.eval_shape(attn.init, jax.random.key(0), x_BTD))
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)["params"]
    assert set(params) == {"query", "key", "value", "out"} | (set(PREFIX_MLP) if mlp_hidden
                                                              else {"prefix_key", "prefix_value"})
    got = attn.apply({"params": params}, x_BTD, causal=True, q_positions=positions, kv_mask=valid,
                     q_segment_ids=segments, kv_segment_ids=segments)
    want = _reference(params, x_BTD, positions, valid, segments, P, mlp_hidden)
    scale = np.abs(want).max()
    err = np.abs(np.asarray(got, np.float64) - want).max()
    print(f"\nprefix attention (mlp_hidden={mlp_hidden}): max abs err {err:.3g} (outputs up to {scale:.3g})")
    # float32 rounding of the projections (length D), logits (H), softmax sums (P + T) and the
    # output projection (N H), each a few eps32 * sqrt(length) of the magnitudes involved.
    assert err <= 16 * EPS32 * np.sqrt(D + H + P + T + N * H) * max(scale, 1.0)


# --- gradients and causality ---------------------------------------------------------------

def test_gradients_reach_every_prefix_and_adapter_and_a_fresh_adapter_leaves_base_gradients_alone():
    ids = random_ids((2, 8))
    model = GPT(with_peft(LLAMA, EVERYTHING))
    params = randomize(shapes(model, ids))

    def loss(p):
        logits = model.apply({"params": p}, ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    grads = flat(jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params))
    peft_leaves = [k for k in grads if is_peft_path(k)]
    assert len(peft_leaves) == LLAMA.num_layers * (len(PREFIX_MLP) + 2 * 4)
    assert all(np.abs(grads[k]).max() > 0 for k in peft_leaves), [k for k in peft_leaves if not grads[k].any()]

    # A fresh (zero `up`) adapter: the base's gradients are the base model's; only `up` and the
    # up bias get a gradient (down's flows through up = 0).
    base = GPT(LLAMA)
    base_params = randomize(shapes(base, ids))
    model = GPT(with_peft(LLAMA, HOULSBY))
    fresh = jax.tree_util.tree_map_with_path(
        lambda path, leaf: flat(base_params).get("/".join(k.key for k in path), leaf), init(model, ids))

    def loss_of(m):
        return jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, ids) ** 2)), compiler_options=FAST_COMPILE)

    g_peft, g_base = flat(loss_of(model)(fresh)), flat(loss_of(base)(base_params))
    for k, g in g_base.items():
        np.testing.assert_allclose(g_peft[k], g, rtol=1e-5, atol=1e-7 * np.abs(g).max())
    for k in (k for k in g_peft if is_peft_path(k)):
        assert bool(np.any(g_peft[k])) == k.endswith(("/up", "/up_bias")), k


def test_prefix_and_adapters_keep_the_decoder_causal():
    model = GPT(with_peft(LLAMA, EVERYTHING))
    ids = random_ids((1, 8))
    params = randomize(shapes(model, ids))
    changed = ids.copy()
    changed[0, 5] = (ids[0, 5] % (VOCAB - 1)) + 1
    a, b = np.asarray(forward(model)(params, np.concatenate([ids, changed])))[:, None]
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_bert_with_a_prefix_ignores_padding_and_the_prefix_changes_its_output():
    model, base = BertForMaskedLM(with_peft(BERT, EVERYTHING)), BertForMaskedLM(BERT)
    ids = random_ids((2, 6))
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], np.int32)
    params = randomize(shapes(model, ids))
    other = ids.copy()
    other[1, 4:] = [5, 9]  # different padding tokens
    a, b = np.split(np.asarray(forward(model)(params, np.concatenate([ids, other]), np.concatenate([mask, mask]))), 2)
    np.testing.assert_allclose(a[1, :4], b[1, :4], rtol=1e-6, atol=1e-6)
    kept = flat(params)  # the same weights without the PEFT leaves
    base_params = jax.tree_util.tree_map_with_path(lambda path, _: kept["/".join(k.key for k in path)],
                                                   shapes(base, ids))
    base_logits = forward(base)(base_params, ids, mask)
    assert not np.allclose(a, base_logits, atol=1e-3)


# --- fold_prefix, scan ----------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_fold_prefix_gives_the_same_logits_with_plain_prefix_params(scan):
    config = with_peft(LLAMA, PREFIX_MLP_CFG)
    ids = random_ids((2, 6))
    params = randomize(shapes(GPT(config), ids))
    model = GPT(dataclasses.replace(config, scan_layers=scan))
    if scan:
        params = scan_params(params, model.config)
    folded_model, folded = fold_prefix(model, params)
    assert folded_model.config.block.peft.prefix == PrefixConfig(length=3, mlp_hidden=0)
    keys = flat(folded)
    assert not any(k.rsplit("/", 1)[-1] in PREFIX_MLP for k in keys)
    assert sum(k.endswith("/prefix_key") for k in keys) == (1 if scan else LLAMA.num_layers)
    want = forward(model)(params, ids)
    got = forward(folded_model)(folded, ids)
    # The same float32 ops on the same numbers, in or out of one fused program.
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * EPS32 * np.abs(want).max())


# --- KV cache and generation ----------------------------------------------------------------

@pytest.mark.parametrize("peft", [PREFIX, EVERYTHING], ids=["prefix", "prefix_mlp_houlsby"])
def test_cached_decoding_with_a_prefix_equals_full_recompute(peft):
    from inference import init_cache

    model = GPT(with_peft(LLAMA, peft))
    lengths = np.array([5, 2, 4])
    seqs = random_ids((3, 8), seed=3)
    params = randomize(shapes(model, seqs))

    @jax.jit
    def write(cache, ids, positions):
        logits, state = model.apply({"params": params, "cache": cache}, ids, positions=positions, mutable=["cache"])
        return logits, state["cache"]

    prompt = np.where(np.arange(5) < lengths[:, None], seqs[:, :5], 0).astype(np.int32)
    cache = init_cache(model, 3, 12)
    logits, cache = write(cache, prompt, np.broadcast_to(np.arange(5), (3, 5)))
    cached = [[np.asarray(logits[b, :n])] for b, n in enumerate(lengths)]
    for step in range(3):  # three one-token decode steps, each row at its own length
        positions = (lengths + step)[:, None]
        logits, cache = write(cache, np.take_along_axis(seqs, positions, 1), positions)
        for b in range(3):
            cached[b].append(np.asarray(logits[b]))
    full = forward(model)(params, seqs)
    for b, n in enumerate(lengths):
        want = np.asarray(full[b, : n + 3])
        np.testing.assert_allclose(np.concatenate(cached[b]), want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_generate_and_the_paged_engine_decode_a_prefix_tuned_model_like_greedy_recompute():
    model = GPT(with_peft(LLAMA, EVERYTHING))
    prompts = [[3, 7, 1, 9, 4], [11, 2]]
    params = randomize(shapes(model, np.ones((1, 4), np.int32)))
    out = generate(model, params, prompts, max_new_tokens=4)
    # Greedy by full recompute: each new token is the argmax of the logits before it (rows
    # right-padded to one length, which a causal model's earlier logits never see).
    rows = np.zeros((2, 9), np.int32)
    for b, (prompt, new) in enumerate(zip(prompts, out)):
        rows[b, : len(prompt) + 4] = prompt + new
    logits = np.asarray(forward(model)(params, rows))
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        assert out[b] == np.argmax(logits[b, n - 1: n + 3], -1).tolist()
    engine = Engine(model, params, num_slots=2, max_len=16, block_size=4, num_blocks=9)
    ids = [engine.submit(Request(p, max_new_tokens=4)) for p in prompts]
    results = engine.run()
    assert [results[i] for i in ids] == out


# --- sharding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,mesh", [("fsdp", "fsdp=8"), ("tp", "data=4,tensor=2"),
                                           ("fsdp_tp", "fsdp=4,tensor=2")])
def test_forward_under_fsdp_and_tp_on_8_devices_equals_dp(strategy, mesh):
    config = with_peft(dataclasses.replace(LLAMA, block=dataclasses.replace(LLAMA.block, num_kv_heads=4)),
                       EVERYTHING)
    model = GPT(config)
    ids = random_ids((8, 6))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])
    params = randomize(nn.unbox(boxed))

    def forward(chosen, mesh_spec):
        s, m = get_strategy(chosen), mesh_lib.make_mesh(mesh_spec)
        shardings = param_shardings(s, m, boxed, zero=s.zero_stage >= 3)
        placed = jax.device_put(params, shardings)
        batch = jax.device_put(ids, NamedSharding(m, nn.logical_to_mesh_axes(("act_batch", None),
                                                                             s.activation_rules(m))))

        def apply(p, x):
            with jax.sharding.use_abstract_mesh(m.abstract_mesh), nn.logical_axis_rules(s.activation_rules(m)):
                return model.apply({"params": p}, x)

        return placed, np.asarray(jax.jit(apply)(placed, batch))

    _, want = forward("dp", "data=8")
    placed, got = forward(strategy, mesh)
    split = [k for k, v in flat(placed).items() if is_peft_path(k) and v.sharding.spec != PartitionSpec()]
    assert split, "no PEFT leaf was laid out by its logical names"
    # Sums over D and over heads split across devices add in another order.
    np.testing.assert_allclose(got, want, rtol=0, atol=16 * EPS32 * np.sqrt(config.block.d_model * 4)
                               * np.abs(want).max())


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("make,key", [
    (lambda: PrefixConfig(length=0), "finetune.prefix.length"),
    (lambda: PrefixConfig(length=-2), "finetune.prefix.length"),
    (lambda: PrefixConfig(length=4, mlp_hidden=-1), "finetune.prefix.mlp_hidden"),
    (lambda: AdapterConfig(hidden=0), "finetune.adapter.hidden"),
    (lambda: AdapterConfig(hidden=8, kind="lora"), "finetune.adapter.kind"),
    (lambda: AdapterConfig(hidden=8, activation="swiglu"), "finetune.adapter.activation"),
])
def test_bad_prefix_and_adapter_configs_are_one_line_errors_naming_the_key(make, key):
    with pytest.raises(ValueError) as error:
        make()
    message = str(error.value)
    assert key in message and "\n" not in message


def test_adapter_activations_are_the_feedforward_ones():
    assert set(ADAPTER_ACTIVATIONS) == set(ACTIVATIONS)
