"""compress/rtn.py: the `rtn` method's stored bytes (counted here from the kernel shapes and
the formats' definitions), its quantized kernels, and its one-line refusals."""

import math

import jax
import jax.numpy as jnp
import pytest

from compress import methods
from compress.methods import Source
from configs import llama as llama_configs
from models import quant
from models.gpt import GPT, llama_config
from models.random_params import random_params

CFG = llama_config(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, max_len=32,
                   scan_layers=True)


@pytest.fixture(scope="module")
def source():
    model = GPT(CFG)
    config = llama_configs.get_config("tiny")
    return Source(model=model, params=random_params(model), config=config)


def kernels(params):
    """(path, shape, contraction rows) of every kernel the rule quantizes, from shapes alone."""
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        rule = quant.contraction(name, x.shape)
        if rule is not None:
            out.append((name, x.shape, math.prod(x.shape[a] for a in rule[1]), rule[0]))
    return out


def expected_bits(params, fmt: str, group: int, sym: bool) -> float:
    """8 * stored bytes / values over the quantized kernels, from the formats' definitions."""
    total_bits = values = 0
    for _, shape, rows, lead in kernels(params):
        n = math.prod(shape)
        lead_n = math.prod(shape[:lead])
        g = rows if fmt in ("int8", "fp8") else min(group, rows)
        groups = n // g  # scales
        if fmt in ("int8", "fp8"):
            bits = 8 * n + 32 * groups
        elif fmt == "int4":
            bits = 4 * n + 32 * groups + (0 if sym else 8 * groups)
        else:  # nf4: u8 scales, a float32 absmax per 256 of each lead index's scales, a float32 offset
            per_lead = groups // lead_n
            bits = 4 * n + 8 * groups + lead_n * 32 * (math.ceil(per_lead / 256) + 1)
        total_bits += bits
        values += n
    return total_bits / values


@pytest.mark.parametrize("fmt,group,sym", [("int8", 128, True), ("int4", 32, True), ("int4", 64, False),
                                           ("nf4", 32, True), ("fp8", 128, True)])
def test_bits_per_weight_are_the_stored_bytes(source, fmt, group, sym):
    out = methods.apply("rtn", source, options=[f"format={fmt}", f"group={group}", f"sym={str(sym).lower()}"])
    assert out.info["bits_per_weight"] == pytest.approx(expected_bits(source.params, fmt, group, sym), rel=1e-12)
    assert out.info["bytes"] == sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(out.params))
    quantized = [x for x in jax.tree_util.tree_leaves(out.params, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    assert len(quantized) == len(kernels(source.params)) == 1 + 1 + 7  # table, head, 7 stacked kernels
    assert all(q.kind == fmt for q in quantized)
    assert out.config.compress.method == "rtn" and out.config.compress.options.format == fmt
    assert methods.get("rtn").kind == "quantize"


def test_one_line_refusals(source):
    with pytest.raises(ValueError) as e:
        methods.apply("rtn", source, options=["format=int4", "group=48"])
    message = str(e.value)
    assert "\n" not in message and "--option=group=48 does not divide the contraction dimension 64" in message
    assert "groups that work: [64, 32, 16, 8, 4, 2]" in message
    with pytest.raises(ValueError, match=r"--option=format='int3' is not a weight format"):
        methods.apply("rtn", source, options=["format=int3"])
    with pytest.raises(ValueError, match=r"--method=rtn has no option 'bits'"):
        methods.apply("rtn", source, options=["bits=4"])
    with pytest.raises(ValueError, match=r"--option=sym='maybe'"):
        methods.apply("rtn", source, options=["sym=maybe"])


def test_a_group_larger_than_a_kernel_is_one_group(source):
    """group=512 on 64-row kernels: one scale per output column (the 'per channel' int4)."""
    out = methods.apply("rtn", source, options=["format=int4", "group=512"])
    q = out.params["layers"]["mlp"]["wi_up"]
    assert q.block_size == 64 and q.scales.shape == (2, 1, 128)
    w = source.params["layers"]["mlp"]["wi_up"]
    assert jnp.abs(q.dequantize() - w).max() <= (jnp.abs(w).max() / 7) / 2 * (1 + 1e-5)
