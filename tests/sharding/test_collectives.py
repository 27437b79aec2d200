"""Collectives of the compiled steps: the parser on known HLO, then each strategy's signature
(DP all-reduces gradients, ZeRO-2 scatters them, ZeRO-3 gathers parameters, Megatron TP
all-reduces twice per layer each way, EP moves tokens with all-to-all in capacity mode and
expert weights in dropless mode; with model.moe.dispatch=all_to_all it moves tokens by
all-to-all in the forward pass in both modes)."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sharding import analysis
from sharding import mesh as mesh_lib

PSI = 90_432  # parameters of the tiny LLaMA
GRAD_BYTES = 4 * PSI

HLO = """HloModule jit_f, entry_computation_layout={()->f32[]}, num_partitions=8

ENTRY %main.1 () -> f32[] {
  %p = f32[8,4]{1,0} parameter(0)
  %pid = u32[] partition-id()
  %ar = f32[8,4]{1,0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(f)/transpose(jvp(m))/dot_general"}
  %ags = (f32[2,4]{1,0}, f32[8,4]{1,0}) all-gather-start(%p), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, metadata={op_name="jit(f)/jvp(m)/dot_general"}
  %agd = f32[8,4]{1,0} all-gather-done(%ags)
  %rs = bf16[2,4]{1,0} reduce-scatter(%p), channel_id=3, replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={0}, to_apply=%add
  %a2a = (f32[4,4]{1,0}, f32[4,4]{1,0}) all-to-all(%p, %p), channel_id=4, replica_groups={}
  %cps = (f32[8,4]{1,0}, f32[8,4]{1,0}, u32[], u32[]) collective-permute-start(%p), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8,4]{1,0} collective-permute-done(%cps)
  %ar2 = (f32[], f32[8,4]{1,0}) all-reduce(%p, %p), channel_id=6, replica_groups={{0,1}}, to_apply=%add
  %gte0 = f32[] get-tuple-element(%ar2), index=0
  %gte1 = f32[8,4]{1,0} get-tuple-element(%ar2), index=1
  %slice = f32[4,4]{1,0} fusion(%gte1, %pid), kind=kLoop, calls=%sliced
  ROOT %out = f32[] add(%gte0, %gte0)
}
"""


def test_parser_on_known_hlo():
    ops = {op.name: op for op in analysis.collectives(HLO)}
    assert set(ops) == {"ar", "ags", "rs", "a2a", "cps", "ar2"}  # -done halves not counted again
    assert (ops["ar"].kind, ops["ar"].bytes, ops["ar"].group_size, ops["ar"].phase) == ("all-reduce", 128, 4,
                                                                                         "backward")
    assert ops["ar"].wire_bytes == 2 * 3 / 4 * 128
    assert (ops["ags"].kind, ops["ags"].bytes, ops["ags"].group_size, ops["ags"].phase) == ("all-gather", 128, 4,
                                                                                            "forward")
    assert (ops["rs"].bytes, ops["rs"].group_size, ops["rs"].wire_bytes) == (16, 4, 48)
    assert (ops["a2a"].bytes, ops["a2a"].group_size) == (128, 8)
    assert (ops["cps"].kind, ops["cps"].bytes) == ("collective-permute", 128)
    assert ops["ar2"].bytes == 132 and ops["ar2"].scattered_bytes == 128 and ops["ar"].scattered_bytes == 0
    summary = analysis.summarize(list(ops.values()))
    assert summary["all-reduce"]["count"] == 2 and summary["all-reduce"]["scattered_count"] == 1
    assert summary["all-gather"]["bytes"] == 128


def test_parser_counts_a_real_reduce_scatter():
    mesh = mesh_lib.make_mesh("data=8")

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data"))
    def scatter(x):
        return jax.lax.psum_scatter(x[0], "data", tiled=True)[None]

    x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data")))
    ops = analysis.collectives(jax.jit(scatter).lower(x).compile())
    assert [(op.kind, op.bytes, op.group_size) for op in ops] == [("reduce-scatter", 32, 8)]


def _summary(run):
    return analysis.summarize(analysis.collectives(run.compiled))


def test_dp_all_reduces_gradients_once(tiny_run):
    s = _summary(tiny_run("llama", "dp", "data=8"))
    assert s["all-reduce"]["count"] >= 1 and s["all-gather"]["count"] == 0 and s["reduce-scatter"]["count"] == 0
    assert s["all-reduce"]["scattered_bytes"] == 0
    # Every gradient once (plus a few scalars): the ZeRO paper's 2Ψ elements per device.
    np.testing.assert_allclose(s["all-reduce"]["wire_bytes"], analysis.communication_theory("dp", PSI, 8), rtol=1e-3)


def test_zero2_reduce_scatters_gradients(tiny_run):
    """On CPU a reduce-scatter is emitted as an all-reduce read in slices (see sharding.analysis)."""
    s = _summary(tiny_run("llama", "zero2", "data=8"))
    scattered = s["all-reduce"]["scattered_bytes"] + 8 * s["reduce-scatter"]["bytes"]
    assert scattered >= 0.85 * GRAD_BYTES, scattered
    assert s["all-gather"]["bytes"] >= 0.9 * 4 * PSI  # updated parameters gathered back (replicated)


def test_zero3_gathers_parameters_for_the_forward(tiny_run):
    ops = analysis.collectives(tiny_run("llama", "zero3", "data=8").compiled)
    gathered = sum(op.bytes for op in ops if op.kind == "all-gather" and op.phase == "forward")
    assert gathered >= 0.9 * 4 * PSI
    assert all(op.kind != "all-gather" or op.phase != "other" for op in ops)  # no gather after the update


def _tensor_all_reduces(run, phase: str) -> int:
    return sum(1 for op in analysis.collectives(run.compiled)
               if op.kind == "all-reduce" and op.phase == phase and op.group_size == 2)


def test_tp_all_reduces_twice_per_layer_each_way(tiny_run):
    runs = {2: tiny_run("llama", "tp", "data=4,tensor=2"),
            4: tiny_run("llama", "tp", "data=4,tensor=2", num_layers=4, train=False)}
    for phase in ("forward", "backward"):
        per_layer = (_tensor_all_reduces(runs[4], phase) - _tensor_all_reduces(runs[2], phase)) / 2
        assert per_layer == analysis.megatron_all_reduces(1)[phase] == 2


def test_tp_sp_gathers_and_scatters_the_sequence_around_each_sublayer(tiny_run):
    counts = {}
    for L, run in ((2, tiny_run("llama", "tp_sp", "data=4,tensor=2")),
                   (4, tiny_run("llama", "tp_sp", "data=4,tensor=2", num_layers=4, train=False))):
        ops = analysis.collectives(run.compiled)
        counts[L] = collections.Counter((op.kind, op.phase, op.scattered_bytes > 0) for op in ops
                                        if op.group_size == 2)
    # Per layer forward: the sequence all-gathered before attention and the MLP, and their
    # outputs reduce-scattered back to sequence shards (on CPU: all-reduces read in slices).
    for key in (("all-gather", "forward", False), ("all-reduce", "forward", True)):
        assert (counts[4][key] - counts[2][key]) / 2 == 2, key


def test_ep_moves_tokens_with_all_to_all(tiny_run):
    """Capacity mode: the token slots move between expert shards by all-to-all. (XLA:CPU puts them
    in the backward pass; the forward dispatch compiles to an all-reduce of the expert buffer.)"""
    run = tiny_run("moe_capacity", "ep", "data=2,expert=4")
    ops = analysis.collectives(run.compiled)
    assert sum(1 for op in ops if op.kind == "all-to-all" and op.group_size == 4) >= 2  # one per MoE layer
    experts = run.program.layout.state.params["layer_0"]["mlp"]["wi_gate"]
    assert experts.spec[0] == "expert"
    shape = run.program.abstract_state.params["layer_0"]["mlp"]["wi_gate"].shape
    assert experts.shard_shape(shape)[0] == shape[0] // 4


def test_ep_dropless_moves_expert_weights_not_tokens(tiny_run, make_tiny_model):
    """Sparse dropless under ep (on CPU grouped_matmul=auto is the tiled scan): each layer's
    three expert tensors are all-gathered whole in the forward pass; the only all-to-alls carry
    less than one token's activations (routing metadata), never the tokens."""
    run = tiny_run("moe", "ep", "data=2,expert=4")
    moe = make_tiny_model("moe").config.block.moe
    assert (moe.dropless_impl, moe.grouped_matmul) == ("sparse", "auto")
    shape = run.program.abstract_state.params["layer_0"]["mlp"]["wi_gate"].shape  # [E, D, F]
    ops = analysis.collectives(run.compiled)
    whole_experts = [op for op in ops if op.kind == "all-gather" and op.phase == "forward"
                     and op.bytes == 4 * np.prod(shape)]
    assert len(whole_experts) == 3 * 2  # gate, up, down of both layers
    token_bytes = 4 * shape[1]
    assert all(op.bytes < token_bytes for op in ops if op.kind == "all-to-all")


@pytest.mark.parametrize("model_name", ["moe_a2a", "moe_capacity_a2a"])
def test_ep_all_to_all_dispatch_moves_tokens_forward_and_no_expert_weights(tiny_run, model_name):
    """dispatch=all_to_all: per MoE layer the token buffer goes to the experts and back by
    all-to-all over the 4 expert shards in the forward pass (and twice more backward); no
    all-gather carries expert weights (one would hold a whole [E, D, F] tensor)."""
    run = tiny_run(model_name, "ep", "data=2,expert=4")
    ops = analysis.collectives(run.compiled)
    shape = run.program.abstract_state.params["layer_0"]["mlp"]["wi_gate"].shape  # [E, D, F]
    token_bytes = 4 * shape[1]
    moved = [op for op in ops if op.kind == "all-to-all" and op.group_size == 4 and op.bytes >= token_bytes]
    assert sum(op.phase == "forward" for op in moved) == 2 * 2  # there and back, both layers
    assert sum(op.phase == "backward" for op in moved) == 2 * 2
    assert all(op.bytes < 4 * np.prod(shape) for op in ops if op.kind == "all-gather")
