"""Checks for models that went through lmlab and back into transformers.

A round trip is exact in the weights, so that is asserted bit for bit. The logits of two torch models with
bitwise-equal weights are not: torch's CPU kernels choose their blocking (and so the order of float32 sums)
by the alignment of each tensor's buffer, which differs between a freshly allocated model and one read from a
safetensors file. The logits are therefore compared within a few float32 roundings of their scale.
"""
import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)


def assert_same_state_dict(got: torch.nn.Module, want: torch.nn.Module):
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    for name, tensor in want_sd.items():
        np.testing.assert_array_equal(got_sd[name].detach().numpy(), tensor.detach().numpy(), err_msg=name)


def assert_same_logits(got: np.ndarray, want: np.ndarray, *, roundings: int = 64):
    """Equal up to `roundings` float32 roundings of the largest logit: reordered sums, not different weights."""
    np.testing.assert_allclose(got, want, rtol=0, atol=roundings * EPS32 * float(np.max(np.abs(want))))
