"""AdamW + clipping + decay mask against a float64 NumPy AdamW written out by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.optimizer import make_optimizer, weight_decay_mask
from train.schedules import make_schedule

B1, B2, EPS, WD, LR = 0.9, 0.95, 1e-8, 0.1, 1e-2


def tiny_params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
        "embed": {"embedding": rng.normal(size=(5, 3))},
        "norm": {"scale": 1.0 + rng.normal(size=(3,))},
    }


def grads_for(step, params):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: rng.normal(size=p.shape), params)


def as_f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def numpy_adamw(params, grads_per_step, decayed, lrs, *, eps=EPS, clip_norm=None):
    """AdamW in float64: bias-corrected moments, decoupled decay lr * wd * param."""
    params = {path: np.array(value, np.float64) for path, value in params.items()}
    mu = {path: np.zeros_like(value) for path, value in params.items()}
    nu = {path: np.zeros_like(value) for path, value in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        if clip_norm is not None:
            norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
            grads = {path: g * min(1.0, clip_norm / norm) for path, g in grads.items()}
        for path, g in grads.items():
            mu[path] = B1 * mu[path] + (1 - B1) * g
            nu[path] = B2 * nu[path] + (1 - B2) * g**2
            m_hat = mu[path] / (1 - B1**t)
            v_hat = nu[path] / (1 - B2**t)
            update = m_hat / (np.sqrt(v_hat) + eps)
            if decayed[path]:
                update = update + WD * params[path]
            params[path] = params[path] - lr * update
    return params


def flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run_optax(optimizer, params, grads_per_step):
    params = as_f32(params)
    state = optimizer.init(params)
    step = jax.jit(lambda g, s, p: optimizer.update(g, s, p))
    for grads in grads_per_step:
        updates, state = step(as_f32(grads), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params


def test_three_adamw_steps_match_numpy_with_masked_decay():
    params = tiny_params()
    grads = [grads_for(step, params) for step in range(3)]
    optimizer = make_optimizer(
        learning_rate=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, grad_clip_norm=None, decay_embeddings=False
    )
    got = flat(run_optax(optimizer, params, grads))
    decayed = {
        "['dense']['kernel']": True,
        "['dense']['bias']": False,
        "['embed']['embedding']": False,
        "['norm']['scale']": False,
    }
    want = numpy_adamw(flat(params), [flat(g) for g in grads], decayed, [LR] * 3)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    # The masked leaves would differ visibly had they been decayed.
    all_decayed = numpy_adamw(flat(params), [flat(g) for g in grads], dict.fromkeys(decayed, True), [LR] * 3)
    for path in ("['dense']['bias']", "['embed']['embedding']", "['norm']['scale']"):
        assert np.max(np.abs(all_decayed[path] - want[path])) > 1e-4


def test_decay_embeddings_true_decays_the_table():
    params = tiny_params()
    grads = [grads_for(0, params)]
    optimizer = make_optimizer(
        learning_rate=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, grad_clip_norm=None, decay_embeddings=True
    )
    got = flat(run_optax(optimizer, params, grads))
    decayed = {
        "['dense']['kernel']": True,
        "['dense']['bias']": False,
        "['embed']['embedding']": True,
        "['norm']['scale']": False,
    }
    want = numpy_adamw(flat(params), [flat(g) for g in grads], decayed, [LR])
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_schedule_is_read_at_the_update_count():
    params = tiny_params()
    grads = [grads_for(step, params) for step in range(3)]
    schedule = make_schedule("cosine", peak_lr=LR, total_steps=4, warmup_steps=2)
    optimizer = make_optimizer(learning_rate=schedule, b1=B1, b2=B2, eps=EPS, weight_decay=WD, grad_clip_norm=None)
    got = flat(run_optax(optimizer, params, grads))
    lrs = [float(schedule(step)) for step in range(3)]  # 0, LR / 2, LR
    decayed = {
        "['dense']['kernel']": True,
        "['dense']['bias']": False,
        "['embed']['embedding']": False,
        "['norm']['scale']": False,
    }
    want = numpy_adamw(flat(params), [flat(g) for g in grads], decayed, lrs)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)


# With eps comparable to |g|, an Adam step depends on the gradient's scale, so clipping shows.
BIG_EPS = 0.5


def test_clipping_scales_large_gradients_to_the_threshold():
    params = tiny_params()
    grads = [jax.tree.map(lambda g: 10.0 * g, grads_for(step, params)) for step in range(2)]
    clip = 1.0
    optimizer = make_optimizer(learning_rate=LR, b1=B1, b2=B2, eps=BIG_EPS, weight_decay=0.0, grad_clip_norm=clip)
    got = flat(run_optax(optimizer, params, grads))
    decayed = dict.fromkeys(got, False)
    want = numpy_adamw(flat(params), [flat(g) for g in grads], decayed, [LR] * 2, eps=BIG_EPS, clip_norm=clip)
    unclipped = numpy_adamw(flat(params), [flat(g) for g in grads], decayed, [LR] * 2, eps=BIG_EPS)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
        assert np.max(np.abs(unclipped[path] - want[path])) > 1e-4

    # First step: update = -lr * g / (|g| + eps) (m_hat = g, sqrt(v_hat) = |g|), so the
    # clipped gradient can be read back from the update; its global norm is the threshold.
    state = optimizer.init(as_f32(params))
    updates, _ = jax.jit(optimizer.update)(as_f32(grads[0]), state, as_f32(params))
    ratio = np.abs(np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)])) / LR
    recovered_abs_grad = BIG_EPS * ratio / (1 - ratio)
    assert np.sqrt(np.sum(recovered_abs_grad**2)) == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize("grad_clip_norm", [0, None, 1e6])
def test_small_or_disabled_clipping_leaves_gradients_alone(grad_clip_norm):
    params = tiny_params()
    grads = [jax.tree.map(lambda g: 10.0 * g, grads_for(step, params)) for step in range(2)]
    optimizer = make_optimizer(
        learning_rate=LR, b1=B1, b2=B2, eps=BIG_EPS, weight_decay=0.0, grad_clip_norm=grad_clip_norm
    )
    got = flat(run_optax(optimizer, params, grads))
    want = numpy_adamw(flat(params), [flat(g) for g in grads], dict.fromkeys(got, False), [LR] * 2, eps=BIG_EPS)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)


class TinyLM(nn.Module):
    """Has every kind of leaf the mask rule distinguishes."""

    @nn.compact
    def __call__(self, ids_BT):
        x_BTD = nn.Embed(num_embeddings=11, features=4, name="token_embed")(ids_BT)
        pos_D = self.param("pos_embed_table", nn.initializers.normal(), (8, 4))
        x_BTD = x_BTD + pos_D[: ids_BT.shape[1]]
        scale_D = self.param("scale", nn.initializers.ones, (4,))
        x_BTD = x_BTD * scale_D
        qkv_BTNH = nn.DenseGeneral(features=(2, 3), name="qkv")(x_BTD)  # 2-D bias
        qkv_BTNH += self.param("query_bias", nn.initializers.zeros, (2, 3))
        x_BTD = nn.Dense(4, name="mlp")(qkv_BTNH.reshape(*ids_BT.shape, 6))
        x_BTD = nn.LayerNorm(name="final_norm")(x_BTD)
        return nn.Dense(11, use_bias=False, name="unembed")(x_BTD)


class PosEmbed(nn.Module):
    """A hand-written table whose parent module name carries 'embed'."""

    @nn.compact
    def __call__(self, x):
        return x + self.param("table", nn.initializers.normal(), (8, x.shape[-1]))[: x.shape[-2]]


class BoxedLM(nn.Module):
    """Logically partitioned params, as the sharded trainer's models have them."""

    @nn.compact
    def __call__(self, ids_BT):
        table = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(), ("vocab", "embed")), (11, 4)
        )
        x_BTD = PosEmbed(name="wpe_embed")(table[ids_BT])
        x_BTD = nn.Dense(
            4, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")), name="mlp"
        )(x_BTD)
        stacked_scale_LD = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("layers", "embed")), (2, 4)
        )
        return x_BTD * stacked_scale_LD[0]


def test_mask_rule_on_a_flax_module():
    # Shapes suffice for the mask, as in the trainer's jax.eval_shape(init) recipe.
    params = jax.eval_shape(TinyLM().init, jax.random.key(0), jnp.zeros((2, 5), jnp.int32))["params"]
    mask = weight_decay_mask(params, decay_embeddings=False)
    assert mask == {
        "token_embed": {"embedding": False},
        "pos_embed_table": True,  # Not under an embed module and not named `embedding`.
        "scale": False,
        "query_bias": False,
        "qkv": {"kernel": True, "bias": False},
        "mlp": {"kernel": True, "bias": False},
        "final_norm": {"scale": False, "bias": False},
        "unembed": {"kernel": True},  # A projection, even under an `embed` name.
    }
    mask = weight_decay_mask(params, decay_embeddings=True)
    assert mask["token_embed"] == {"embedding": True}
    assert mask["qkv"]["bias"] is False and mask["scale"] is False


def test_mask_on_boxed_params_and_boxed_update_matches_unboxed():
    shapes = jax.eval_shape(BoxedLM().init, jax.random.key(0), jnp.zeros((2, 5), jnp.int32))
    rng = np.random.default_rng(0)
    boxed = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes["params"])
    assert isinstance(boxed["embedding"], nn.LogicallyPartitioned)
    mask = weight_decay_mask(boxed, decay_embeddings=False)
    assert mask == {
        "embedding": False,
        "wpe_embed": {"table": False},
        "mlp": {"kernel": True, "bias": False},
        "scale": False,
    }
    plain = nn.unbox(boxed)
    assert weight_decay_mask(plain, decay_embeddings=False) == mask

    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), plain)
    optimizer = make_optimizer(learning_rate=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, grad_clip_norm=1.0)
    plain_updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(plain), plain)
    boxed_grads = jax.tree.map(
        lambda box, g: box.replace_boxed(g) if isinstance(box, nn.Partitioned) else g,
        boxed,
        grads,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    boxed_updates, _ = jax.jit(optimizer.update)(boxed_grads, optimizer.init(boxed), boxed)
    assert isinstance(boxed_updates["embedding"], nn.LogicallyPartitioned)
    jax.tree.map(np.testing.assert_allclose, nn.unbox(boxed_updates), plain_updates)
    # A first Adam step is -lr * sign(g), clipped or not; decay adds -lr * wd * p on the kernel.
    np.testing.assert_allclose(plain_updates["scale"], np.full((2, 4), -LR), rtol=1e-5)
    np.testing.assert_allclose(plain_updates["wpe_embed"]["table"], np.full((8, 4), -LR), rtol=1e-5)
    np.testing.assert_allclose(plain_updates["mlp"]["kernel"], -LR - LR * WD * plain["mlp"]["kernel"], rtol=1e-5)
