"""Position-wise feed-forward networks: plain (ReLU, GELU, SiLU) and gated (SwiGLU, GeGLU).

Axis letters: B batch, T length, D model width, F hidden width.

Plain:  y = W_o act(W_i x + b_i) + b_o                     (Vaswani et al. 2017)
Gated:  y = W_o (act(W_gate x) * (W_up x))                   (Shazeer 2020, "GLU variants")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import linear
from models.layers.peft import LoraConfig, lora_project

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}
# Gated variants: name -> activation applied to the gate branch.
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
MLP_ACTIVATIONS = tuple(ACTIVATIONS) + tuple(GATED)

DEFAULT_KERNEL_INIT = nn.initializers.xavier_uniform()


class FeedForward(nn.Module):
    """Feed-forward sub-layer.

    Attributes:
      hidden_dim: F.
      activation: one of MLP_ACTIVATIONS; the gated ones ("swiglu", "geglu", ...) use
        two input projections, `wi_gate` and `wi_up`.
      use_bias: biases on the projections.
      dropout_rate: dropout on the hidden activation (as torch.nn.TransformerEncoderLayer).
      lora: LoRA on the kernels its `targets` regex matches (`models.layers.peft`).

    When the `layer_inputs` collection is mutable (calibration), each kernel's input is sown
    there under the '+'-joined names of the kernels that read it (`wi_gate+wi_up` or `wi`,
    then `wo`).
    """

    hidden_dim: int
    activation: str = "relu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    lora: LoraConfig | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = DEFAULT_KERNEL_INIT

    def _dense(self, x, name: str, out: int, axes: tuple[str, str], deterministic: bool = True):
        kernel = linear.kernel_param(self, name, self.kernel_init, (x.shape[-1], out), self.param_dtype, axes)
        y = linear.project(x, kernel.astype(self.dtype))  # einsum("...i,io->...o"), laid out for the backward
        y = lora_project(self, name, kernel, x, y, n_in=1, names=axes, lora=self.lora, deterministic=deterministic)
        if self.use_bias:
            bias = self.param(
                name + "_bias", nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), (out,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y

    @nn.compact
    def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if self.activation not in MLP_ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {MLP_ACTIVATIONS}")
        D = x_BTD.shape[-1]
        x_BTD = x_BTD.astype(self.dtype)
        # Calibration (`compress.calibration`) reads each kernel's input when `layer_inputs` is mutable.
        linear.sow_input(self, "wi_gate+wi_up" if self.activation in GATED else "wi", x_BTD)
        if self.activation in GATED:
            act = ACTIVATIONS[GATED[self.activation]]
            gate_BTF = self._dense(x_BTD, "wi_gate", self.hidden_dim, ("embed", "mlp"), deterministic)
            up_BTF = self._dense(x_BTD, "wi_up", self.hidden_dim, ("embed", "mlp"), deterministic)
            h_BTF = act(gate_BTF) * up_BTF
        else:
            h_BTF = ACTIVATIONS[self.activation](self._dense(x_BTD, "wi", self.hidden_dim, ("embed", "mlp"),
                                                             deterministic))
        h_BTF = nn.with_logical_constraint(h_BTF, ("act_batch", "act_seq", "act_mlp"))
        h_BTF = nn.Dropout(self.dropout_rate)(h_BTF, deterministic=deterministic)
        linear.sow_input(self, "wo", h_BTF)
        return self._dense(h_BTF, "wo", D, ("mlp", "embed"), deterministic)
