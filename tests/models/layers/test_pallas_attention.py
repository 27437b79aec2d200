"""The Pallas forward kernel (interpreted on CPU) equals the reference, outputs and
gradients (the backward is flash_attention's), for the mask kinds it reads itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers.attention import dot_product_attention
from models.layers.flash_attention import flash_attention
from models.layers.pallas_attention import pallas_attention
from tests.models.layers.test_flash_attention import EPS_BF16, B, _case, inputs, out_and_grads, tolerance


def pallas(q, k, v, **kwargs):
    return pallas_attention(q, k, v, block_q=16, block_kv=16, **kwargs)


# The kernel's own mask kinds (positions, padding with a fully padded row, segments,
# windows, decoding offsets). A bias or dense mask takes the blockwise route (see the next test),
# which tests/models/layers/test_flash_attention.py covers.
@pytest.mark.parametrize("name", ("causal_gqa", "padding", "segments", "window_bidirectional", "decode_offset"))
def test_equals_reference_outputs_and_gradients(name):
    kv_heads, t, s, masks, bias = _case(name)
    q, k, v, cotangent = inputs(kv_heads, t, s)
    want, want_grads = out_and_grads(dot_product_attention, q, k, v, bias, cotangent, **masks)
    got, got_grads = out_and_grads(pallas, q, k, v, bias, cotangent, **masks)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want, s))
    for label, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
        if w is not None:
            np.testing.assert_allclose(g, w, rtol=0, atol=tolerance(w, max(s, t)), err_msg=label)
    if name == "padding":
        assert not got[1].any()


def test_kernel_is_what_runs_and_matches_blockwise_forward():
    """Without bias or dense mask the forward is the pallas_call (visible in the jaxpr),
    and its saved output equals the blockwise forward's to f32 rounding."""
    kv_heads, t, s, masks, _ = _case("segments")
    q, k, v, _ = inputs(kv_heads, t, s)
    jaxpr = str(jax.make_jaxpr(lambda q: pallas(q, k, v, **masks))(q))
    assert "pallas_call" in jaxpr
    assert "pallas_call" not in str(jax.make_jaxpr(lambda q: pallas(q, k, v, bias=jnp.zeros((t, s))))(q))
    want = np.asarray(flash_attention(q, k, v, block_q=16, block_kv=16, **masks))
    np.testing.assert_allclose(pallas(q, k, v, **masks), want, rtol=0, atol=tolerance(want, s))


def test_bfloat16_inputs():
    """As tests/models/layers/test_flash_attention.py's bf16 test: within 4 bf16 ulps of
    the f32 result on the same rounded inputs."""
    kv_heads, t, s, masks, _ = _case("bias_broadcast_causal")  # MQA, causal (without the bias)
    q, k, v, _ = inputs(kv_heads, t, s, dtype=jnp.bfloat16)
    exact = np.asarray(dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), **masks))
    got = pallas(q, k, v, **masks)
    assert got.dtype == jnp.bfloat16 and got.shape == (B, t, 4, 8)
    np.testing.assert_allclose(np.asarray(got, np.float32), exact, rtol=0, atol=4 * EPS_BF16 * np.abs(exact).max())
