"""The strategy tables: what each splits, and the errors of a strategy that cannot apply."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from models.gpt import GPT, llama_config, mixtral_config
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding.layout import state_layout
from sharding.strategies import STRATEGIES, check_applies, get_strategy
from train import step as step_lib
from train.optimizer import make_optimizer

SMALL = {"vocab_size": 128, "d_model": 64, "num_layers": 1, "max_len": 32}


def _boxed_state(config):
    tx = make_optimizer(learning_rate=1e-3)
    init = functools.partial(step_lib.init_state, sample_ids_BT=jnp.zeros((1, 8), jnp.int32), model=GPT(config), tx=tx)
    return jax.eval_shape(init, jax.random.key(0)), tx


def _layout(strategy, mesh, config=None):
    boxed, tx = _boxed_state(config or llama_config(num_heads=4, num_kv_heads=2, d_ff=128, **SMALL))
    return state_layout(get_strategy(strategy), mesh_lib.make_mesh(mesh), boxed, tx)


def test_zero_stages_differ_only_in_what_is_split():
    attention = ("layer_0", "self_attention", "query")

    def spec(tree):
        for key in attention:
            tree = tree[key]
        return tree.spec

    for strategy, (params, grads, moments) in {
        "dp": (PartitionSpec(None, None, None),) * 3,
        "zero1": (PartitionSpec(None, None, None),) * 2 + (PartitionSpec("data", None, None),),
        "zero2": (PartitionSpec(None, None, None),) + (PartitionSpec("data", None, None),) * 2,
        "zero3": (PartitionSpec("data", None, None),) * 3,
    }.items():
        layout = _layout(strategy, "data=8")
        adam = layout.state.opt_state[1][0]
        assert (spec(layout.state.params), spec(layout.grads), spec(adam.mu), spec(adam.nu)) == \
            (params, grads, moments, moments), strategy
        assert adam.count.spec == PartitionSpec()


def test_a_leaf_zero_cannot_split_is_kept_whole_with_a_warning():
    """d_model 36 does not divide by 8: the norm scales (embed only) stay whole, and ZeRO says so;
    the tiny LLaMA, whose every leaf divides, lays out without a word."""
    odd = llama_config(num_heads=2, num_kv_heads=2, d_ff=128, **{**SMALL, "d_model": 36})
    with pytest.warns(UserWarning, match=r"zero3 keeps a leaf of shape \(36,\) \('embed',\) whole on every "
                                         r"device.*divides by mesh axes .* of size 8; make one a multiple of 8"):
        layout = _layout("zero3", "data=8", odd)
    assert layout.state.params["final_norm"]["scale"].spec == PartitionSpec(None)
    assert layout.state.params["layer_0"]["mlp"]["wo"].spec == PartitionSpec("data", None)  # mlp 128 splits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _layout("zero3", "data=8")


def test_megatron_and_composite_tables():
    layout = _layout("fsdp_tp", "data=2,fsdp=2,tensor=2")
    p = layout.state.params["layer_0"]
    assert p["self_attention"]["query"].spec == PartitionSpec("fsdp", "tensor", None)  # column parallel
    assert p["self_attention"]["out"].spec == PartitionSpec("tensor", None, "fsdp")    # row parallel
    assert p["mlp"]["wo"].spec == PartitionSpec("tensor", "fsdp")
    assert layout.state.params["embed"]["embedding"].spec == PartitionSpec("tensor", "fsdp")  # vocab parallel
    assert layout.batch.spec == PartitionSpec(("data", "fsdp"))  # rows only: batch leaves of any rank
    # Sequence parallelism: the residual stream takes `tensor` along T, never where a head,
    # MLP or vocabulary dimension holds it.
    rules = get_strategy("tp_sp").activation_rules(mesh_lib.make_mesh("data=4,tensor=2"))
    assert nn.logical_to_mesh_axes(("act_batch", "act_seq", "act_embed"), rules) == PartitionSpec("data", "tensor",
                                                                                                   None)
    assert nn.logical_to_mesh_axes(("act_batch", "act_seq", "act_mlp"), rules) == PartitionSpec("data", None, "tensor")


def test_pipeline_tables():
    """The stacked layers split into stages over `stage`, composed with FSDP and Megatron; the
    embedding and head are on every stage."""
    config = llama_config(num_heads=4, num_kv_heads=2, d_ff=128, scan_layers=True, **{**SMALL, "num_layers": 2})
    layout = _layout("pp_fsdp_tp", "stage=2,fsdp=2,tensor=2", config)
    p = layout.state.params["layers"]
    assert p["self_attention"]["query"].spec == PartitionSpec("stage", "fsdp", "tensor", None)
    assert p["mlp"]["wo"].spec == PartitionSpec("stage", "tensor", "fsdp")
    assert layout.state.params["embed"]["embedding"].spec == PartitionSpec("tensor", "fsdp")
    assert nn.logical_to_mesh_axes(("act_stage", "act_batch", "act_seq", "act_embed"), layout.rules) == \
        PartitionSpec("stage", "fsdp", None, None)


def test_every_strategy_runs_on_its_default_mesh():
    for strategy in STRATEGIES.values():
        if strategy.name != "ep":
            check_applies(strategy, mesh_lib.make_mesh(strategy.default_mesh))
    assert rules_lib.rules_for("dp") == (("act_batch", "data"),)


def _error(strategy, mesh, config=None, **kwargs) -> str:
    boxed, _ = _boxed_state(config or llama_config(num_heads=4, num_kv_heads=2, d_ff=128, **SMALL))
    with pytest.raises(ValueError) as info:
        check_applies(get_strategy(strategy), mesh_lib.make_mesh(mesh), boxed.params, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("strategy,mesh,config,expected", [
    ("tp", "data=2,tensor=4", None, ["`kv_heads`", "= 2", "`tensor` of size 4", "tensor=2"]),
    ("tp", "tensor=8", llama_config(num_heads=4, num_kv_heads=4, d_ff=128, **SMALL),
     ["`heads`", "= 4", "`tensor` of size 8", "tensor=4"]),
    ("tp", "data=4,tensor=2", llama_config(num_heads=4, num_kv_heads=2, d_ff=99, **SMALL),
     ["`mlp`", "d_ff", "= 99", "`tensor` of size 2"]),
    ("tp", "data=4,tensor=2", llama_config(num_heads=4, num_kv_heads=2, d_ff=128, **{**SMALL, "vocab_size": 127}),
     ["`vocab`", "= 127", "`tensor` of size 2"]),
    ("ep", "expert=8", mixtral_config(num_experts=4, num_heads=4, num_kv_heads=2, d_ff=64, **SMALL),
     ["`expert`", "num_experts", "= 4", "`expert` of size 8", "expert=4"]),
    ("pp", "stage=4,data=2", llama_config(num_heads=4, num_kv_heads=2, d_ff=128, scan_layers=True,
                                          **{**SMALL, "num_layers": 6}),
     ["`layers`", "model.num_layers", "= 6", "`stage` of size 4", "data=-1,stage=2"]),
])
def test_model_dimension_errors(strategy, mesh, config, expected):
    message = _error(strategy, mesh, config)
    for part in expected:
        assert part in message, (part, message)


def test_batch_mesh_and_sequence_errors():
    message = _error("zero3", "data=8", batch_size=12)
    assert all(part in message for part in ("12 rows", "8 devices", "('data',)", "multiple of 8")), message
    message = _error("zero3", "data=4,tensor=2")
    assert "does not use mesh axis `tensor`" in message and "tp, tp_sp, fsdp_tp" in message, message
    message = _error("tp", "data=8")
    assert "`tensor`" in message and "--mesh=data=-1,tensor=2" in message, message
    message = _error("tp_sp", "data=4,tensor=2", seq_len=15)
    assert "seq_len = 15" in message and "multiple of 2" in message, message
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero4'.*zero3"):
        get_strategy("zero4")
