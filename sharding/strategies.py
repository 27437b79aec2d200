"""Sharding strategies: ZeRO-1/2/3, FSDP and Megatron tensor, sequence and expert parallelism.

Models name logical axes only: parameters `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `expert`, `layers`; activations `act_batch`, `act_seq`, `act_embed`, `act_heads`,
`act_kv_heads`, `act_mlp`, `act_vocab`. A strategy says which mesh axes those names are
split over, with three small pieces:

  * `batch_axes`: the mesh axes the batch (`act_batch`) is split over: data parallelism.
  * `model_rules`: a logical-to-mesh table for model parallelism, applied alike to the
    parameters and to the activations (Megatron's column/row-parallel layers, sequence
    parallelism, expert parallelism). A dimension it names must divide evenly.
  * `zero_stage` and `zero_axes`: ZeRO (Rajbhandari et al. 2020). Besides the model rules,
    the optimizer state (stage >= 1), the gradients (>= 2) and the parameters (3) are split
    over `zero_axes`, each leaf along the first dimension in `ZERO_DIMS` whose size divides
    (every matrix has an `embed` dimension, so in practice along `embed`); a leaf with no
    such dimension stays replicated. ZeRO stages differ only in which of the three the
    table shards.

The mesh axes are named `data`, `fsdp`, `tensor`, `expert` and `stage` (`sharding.mesh` builds them
from strings such as "data=2,fsdp=2,tensor=2"). A strategy uses the subset of its axes
that the mesh has, so the mesh shape picks the composite: `fsdp` on "data=2,fsdp=4" is
hybrid sharding (parameters split over 4 and replicated over 2), `zero3` on the same mesh
splits them over all 8.

The table of strategies (N devices, Ψ parameters):

  dp       parameters, gradients and Adam state replicated; gradients all-reduced.
  zero1    Adam state split over the data axes (ZeRO stage 1, P_os).
  zero2    + gradients split: reduce-scattered instead of all-reduced (P_os+g).
  zero3    + parameters split, all-gathered layer by layer when used (P_os+g+p).
  fsdp     zero3 over the `fsdp` axis only (FSDP; with a `data` axis too, HSDP).
  tp       Megatron tensor parallelism over `tensor`: column-parallel q/k/v and MLP input
           projections (heads, kv_heads, mlp split), row-parallel output and down
           projections (their input dimension split), vocab-parallel embedding, output
           head and cross-entropy; two all-reduces per layer forward and two backward.
  tp_sp    + sequence parallelism (Korthikanti et al. 2022): the residual stream, norms and
           dropout split along the sequence over `tensor` outside attention and MLP; the
           all-reduces become all-gather / reduce-scatter pairs.
  fsdp_tp  2-D: fsdp over `fsdp`, tp over `tensor`.
  ep       expert parallelism: experts split over `expert`, the batch over data x expert;
           tokens reach their experts by all-to-all (capacity mode). With
           `model.moe.dispatch=all_to_all` the MoE layer sends them itself, by shard_map
           all-to-alls over the mesh axis these rules give logical `expert`, in capacity and
           dropless mode (models/layers/expert_dispatch.py).
  pp       pipeline parallelism (GPipe) over `stage`: the stacked layers (`layers`) split into
           consecutive stages, micro-batches passed stage to stage by collective-permutes
           (`models.layers.pipeline`; the model needs scan_layers and pipeline_microbatches);
           data parallel over `data`.
  pp_fsdp  + FSDP over `fsdp` (each stage's parameters split further).
  pp_tp    + Megatron tensor parallelism over `tensor` within each stage.
  pp_fsdp_tp  3-D: stage x fsdp x tensor.
  cp       context parallelism: every activation split along the sequence over `context`, the
           batch over `data`; attention impl "ring" passes key/value chunks around the
           `context` ring (`models.layers.ring_attention`), and `sharding.context` feeds each
           device the token chunks i and 2C-1-i (zig-zag) so causal work is balanced.
  fsdp_cp  2-D: fsdp over `fsdp`, cp over `context`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, PartitionSpec

Rules = tuple[tuple[str, Any], ...]

DATA, FSDP, TENSOR, EXPERT = "data", "fsdp", "tensor", "expert"
STAGE = "stage"
CONTEXT = "context"
MESH_AXES = (DATA, FSDP, TENSOR, EXPERT, STAGE, CONTEXT)

# Megatron-LM (Shoeybi et al. 2019). Column-parallel layers split their output features
# (q/k/v per head, the MLP's gate and up); row-parallel layers (attention output, MLP down)
# split their input features, which are the same logical names, so one table gives both.
# The embedding table and output head split the vocabulary.
TENSOR_PARALLEL: Rules = (
    ("heads", TENSOR), ("kv_heads", TENSOR), ("mlp", TENSOR), ("vocab", TENSOR),
    ("act_heads", TENSOR), ("act_kv_heads", TENSOR), ("act_mlp", TENSOR), ("act_vocab", TENSOR),
)
# After the table above: an activation takes `tensor` for its sequence only where no head,
# MLP or vocabulary dimension took it first (flax assigns each mesh axis once, in order),
# i.e. on the residual stream [B, T, D] around the norms, dropout and residual adds.
SEQUENCE_PARALLEL: Rules = (("act_seq", TENSOR),)
# Each device holds E / |expert| experts (GShard, Switch); tokens are dispatched to them.
# (`act_expert` is the activation name of the dispatched tokens' expert dimension; the MoE
# layer currently constrains them with the parameter name `expert`, which maps the same.)
EXPERT_PARALLEL: Rules = (("expert", EXPERT), ("act_expert", EXPERT))
# Context parallelism: the sequence of every activation over `context` (parameters whole).
CONTEXT_PARALLEL: Rules = (("act_seq", CONTEXT),)

# Pipeline parallelism (GPipe): the stacked layers split into consecutive stages over `stage`,
# and the pipeline's state buffer [stages, micro-batch rows, T, D] with them
# (`models.layers.pipeline`; the model runs it with `pipeline_microbatches` > 0).
PIPELINE: Rules = (("layers", STAGE), ("act_stage", STAGE))

# ZeRO splits a leaf along the first of these dimensions that divides evenly.
ZERO_DIMS = ("embed", "vocab", "mlp", "heads", "kv_heads", "expert", "head_dim", "q_lora", "kv_lora")

# What a logical dimension is, and where a config sets it (for error messages).
DIMENSIONS = {
    "embed": "model width (model.block.d_model)",
    "heads": "query heads (model.block.num_heads)",
    "kv_heads": "key/value heads (model.block.num_kv_heads)",
    "mlp": "MLP hidden width (model.block.d_ff; with experts model.moe.expert_d_ff)",
    "vocab": "vocabulary (model.vocab_size; pad it to a multiple of the axis)",
    "expert": "experts (model.moe.num_experts)",
    "head_dim": "head dimension (model.block.head_dim)",
    "layers": "stacked layers (model.num_layers)",
}


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One row of the strategy table (see the module docstring).

    Attributes:
      name: the `config.sharding.strategy` value.
      summary: one line for tables and `--help`.
      default_mesh: the mesh used when `config.sharding.mesh` is empty.
      batch_axes: mesh axes the batch is split over.
      model_rules: logical-to-mesh table for parameters and activations alike.
      zero_stage: 0 (none), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters).
      zero_axes: mesh axes the ZeRO-split state is split over.
      required_axes: mesh axes without which the strategy means nothing.
    """

    name: str
    summary: str
    default_mesh: str = "data=-1"
    batch_axes: tuple[str, ...] = (DATA,)
    model_rules: Rules = ()
    zero_stage: int = 0
    zero_axes: tuple[str, ...] = ()
    required_axes: tuple[str, ...] = ()

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        """Every mesh axis this strategy can use."""
        used = {*self.batch_axes, *self.zero_axes, *(a for _, axes in self.model_rules for a in _axes_tuple(axes))}
        return tuple(a for a in MESH_AXES if a in used)

    def activation_rules(self, mesh: Mesh | None) -> Rules:
        """The logical axis rules to trace the model under (`nn.logical_axis_rules`), for the
        axes `mesh` has (None: all of the strategy's axes).

        The model rules come first, then the batch over all batch axes, then the batch over
        those the model rules do not use: an activation that already spends the `expert`
        axis on its expert dimension (tokens grouped per expert) still splits its batch
        over `data` (flax gives each dimension the first rule whose mesh axes are free).
        """
        model = _filter(self.model_rules, mesh)
        batch = _present(self.batch_axes, mesh)
        model_axes = {a for _, axes in model for a in _axes_tuple(axes)}
        rest = _present(tuple(a for a in _axes_tuple(batch) if a not in model_axes), mesh)
        fallback = (("act_batch", rest),) if rest is not None and rest != batch else ()
        return model + (("act_batch", batch),) + fallback

    def spec(self, names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, *, zero: bool) -> PartitionSpec:
        """The PartitionSpec of one state leaf with logical `names` and `shape`.

        The model rules first; then, if `zero`, the ZeRO axes on the first `ZERO_DIMS`
        dimension that is still unsplit and divides evenly (none: the leaf stays whole).
        """
        spec = list(nn.logical_to_mesh_axes(tuple(names), _filter(self.model_rules, mesh)))
        zero_axes = _present(self.zero_axes, mesh)
        if zero and zero_axes is not None:
            size = axis_size(mesh, zero_axes)
            tried = [dim for dim in ZERO_DIMS if dim in names and spec[list(names).index(dim)] is None]
            fits = [dim for dim in tried if shape[list(names).index(dim)] % size == 0]
            if fits:
                spec[list(names).index(fits[0])] = zero_axes
            elif tried and size > 1:
                # A whole copy per device is correct but costs memory the ZeRO formulas do not count.
                warnings.warn(f"{self.name} keeps a leaf of shape {tuple(shape)} {tuple(names)} whole on "
                              f"every device: none of its dimensions {tried} divides by mesh axes {zero_axes} of "
                              f"size {size}; make one a multiple of {size} or use a smaller {zero_axes} axis",
                              stacklevel=2)
        return PartitionSpec(*spec)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("dp", "data parallel: everything replicated, gradients all-reduced"),
    Strategy("zero1", "ZeRO-1: optimizer state split over the data axes", batch_axes=(DATA, FSDP),
             zero_stage=1, zero_axes=(DATA, FSDP)),
    Strategy("zero2", "ZeRO-2: + gradients split (reduce-scatter)", batch_axes=(DATA, FSDP),
             zero_stage=2, zero_axes=(DATA, FSDP)),
    Strategy("zero3", "ZeRO-3: + parameters split, gathered when used", batch_axes=(DATA, FSDP),
             zero_stage=3, zero_axes=(DATA, FSDP)),
    Strategy("fsdp", "FSDP: ZeRO-3 over the fsdp axis (with a data axis: HSDP)", default_mesh="fsdp=-1",
             batch_axes=(DATA, FSDP), zero_stage=3, zero_axes=(FSDP,), required_axes=(FSDP,)),
    Strategy("tp", "Megatron tensor parallel over tensor, data parallel over data", default_mesh="data=-1,tensor=2",
             model_rules=TENSOR_PARALLEL, required_axes=(TENSOR,)),
    Strategy("tp_sp", "tensor + sequence parallel (residual stream split along the sequence)",
             default_mesh="data=-1,tensor=2", model_rules=TENSOR_PARALLEL + SEQUENCE_PARALLEL,
             required_axes=(TENSOR,)),
    Strategy("fsdp_tp", "2-D: FSDP over fsdp, tensor parallel over tensor", default_mesh="fsdp=-1,tensor=2",
             batch_axes=(DATA, FSDP), model_rules=TENSOR_PARALLEL, zero_stage=3, zero_axes=(FSDP,),
             required_axes=(FSDP, TENSOR)),
    Strategy("ep", "expert parallel: experts over expert, batch over data x expert",
             default_mesh="data=-1,expert=4", batch_axes=(DATA, EXPERT), model_rules=EXPERT_PARALLEL,
             required_axes=(EXPERT,)),
    Strategy("pp", "pipeline parallel: layers in stages over stage, data parallel over data",
             default_mesh="stage=2,data=-1", model_rules=PIPELINE, required_axes=(STAGE,)),
    Strategy("pp_fsdp", "pipeline over stage, FSDP over fsdp", default_mesh="stage=2,fsdp=-1",
             batch_axes=(DATA, FSDP), model_rules=PIPELINE, zero_stage=3, zero_axes=(FSDP,),
             required_axes=(STAGE, FSDP)),
    Strategy("pp_tp", "pipeline over stage, tensor parallel over tensor", default_mesh="stage=2,data=-1,tensor=2",
             model_rules=PIPELINE + TENSOR_PARALLEL, required_axes=(STAGE, TENSOR)),
    Strategy("pp_fsdp_tp", "3-D: pipeline over stage, FSDP over fsdp, tensor parallel over tensor",
             default_mesh="stage=2,fsdp=-1,tensor=2", batch_axes=(DATA, FSDP), model_rules=PIPELINE + TENSOR_PARALLEL,
             zero_stage=3, zero_axes=(FSDP,), required_axes=(STAGE, FSDP, TENSOR)),
    Strategy("cp", "context parallel: sequence over context (ring attention), batch over data",
             default_mesh="data=-1,context=4", model_rules=CONTEXT_PARALLEL, required_axes=(CONTEXT,)),
    Strategy("fsdp_cp", "2-D: FSDP over fsdp, context parallel over context", default_mesh="fsdp=-1,context=4",
             batch_axes=(DATA, FSDP), model_rules=CONTEXT_PARALLEL, zero_stage=3, zero_axes=(FSDP,),
             required_axes=(FSDP, CONTEXT)),
)}


def get_strategy(name: str) -> Strategy:
    """The strategy called `name` (a ValueError lists the valid ones)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {name!r}; expected one of {tuple(STRATEGIES)}")
    return STRATEGIES[name]


def axis_size(mesh: Mesh, axes) -> int:
    """Devices along a mesh axis, a tuple of axes, or None (1)."""
    return math.prod(mesh.shape[a] for a in _axes_tuple(axes))


def model_shards(strategy: Strategy, mesh: Mesh) -> dict[str, int]:
    """Logical axis name -> how many ways the strategy's model rules split it on `mesh` (names
    the rules leave whole are absent): what a quantized field whose last axis is shorter than
    its kernel's needs to know (`models.quant.logically_partitioned`)."""
    return {name: axis_size(mesh, axes) for name, axes in _filter(strategy.model_rules, mesh)}


def check_applies(strategy: Strategy, mesh: Mesh, boxed_params: Any = None, *, batch_size: int | None = None,
                  seq_len: int | None = None) -> None:
    """Raises a ValueError naming the dimension, its size, the mesh axis and its size, and a fix,
    if `strategy` cannot run on `mesh` for this model and batch.

    Args:
      strategy: the strategy.
      mesh: the device mesh.
      boxed_params: the model's logically partitioned params (e.g. from `jax.eval_shape` of
        `model.init`); their model-parallel dimensions must divide evenly.
      batch_size: the global (micro-)batch, split over the strategy's batch axes.
      seq_len: the sequence length, split over `tensor` by sequence parallelism and into 2 x
        |context| zig-zag chunks by context parallelism.
    """
    mesh_text = ",".join(f"{a}={s}" for a, s in mesh.shape.items())
    unused = [a for a, s in mesh.shape.items() if a not in strategy.mesh_axes and s > 1]
    if unused:
        users = [s.name for s in STRATEGIES.values() if unused[0] in s.mesh_axes]
        raise ValueError(f"strategy `{strategy.name}` does not use mesh axis `{unused[0]}` (size "
                         f"{mesh.shape[unused[0]]}) of mesh {mesh_text}: its devices would repeat the same work. "
                         f"Drop it from the mesh (default for {strategy.name}: {strategy.default_mesh}) or use a "
                         f"strategy that splits over it: {', '.join(users)}")
    missing = [a for a in strategy.required_axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"strategy `{strategy.name}` splits over mesh axis `{missing[0]}`, which mesh {mesh_text} "
                         f"lacks; use e.g. --mesh={strategy.default_mesh}")
    if boxed_params is not None:
        _check_params(strategy, mesh, boxed_params)
    batch = _present(strategy.batch_axes, mesh)
    if batch_size is not None and batch_size % axis_size(mesh, batch):
        size = axis_size(mesh, batch)
        raise ValueError(f"strategy `{strategy.name}` splits the batch over mesh axes {_axes_tuple(batch)} of "
                         f"{size} devices, but the batch has {batch_size} rows (data.batch_size, divided by "
                         f"optimizer.grad_accum_steps); use a multiple of {size} rows or a smaller "
                         f"data-parallel mesh")
    seq_axes = dict(_filter(strategy.model_rules, mesh)).get("act_seq")
    if seq_len is not None and seq_axes and seq_len % axis_size(mesh, seq_axes):
        size = axis_size(mesh, seq_axes)
        raise ValueError(f"strategy `{strategy.name}` splits the sequence (data.seq_len = {seq_len}) over mesh "
                         f"axis `{seq_axes}` of size {size}; use a seq_len that is a multiple of {size}")
    ring = mesh.shape.get(CONTEXT, 1) if CONTEXT in strategy.mesh_axes else 1
    if seq_len is not None and ring > 1 and seq_len % (2 * ring):
        raise ValueError(f"strategy `{strategy.name}` cuts the sequence (data.seq_len = {seq_len}) into 2 x {ring} "
                         f"zig-zag chunks for the {ring} devices of mesh axis `{CONTEXT}`; use a seq_len that is a "
                         f"multiple of {2 * ring}")


def check_pipeline_batch(strategy: Strategy, mesh_shape: dict[str, int], rows: int, microbatches: int) -> None:
    """Raises a ValueError unless a pipeline strategy's `rows` (one step's, or accumulation
    micro-batch's) split into `microbatches` pipeline micro-batches whose rows split evenly over
    the batch axes; nothing to check without a `stage` axis."""
    if STAGE not in strategy.mesh_axes or mesh_shape.get(STAGE, 1) == 1:
        return
    devices = math.prod(mesh_shape.get(a, 1) for a in strategy.batch_axes)
    if microbatches < 1 or rows % (microbatches * devices):
        raise ValueError(f"strategy `{strategy.name}` splits the batch's {rows} rows (data.batch_size / "
                         f"optimizer.grad_accum_steps) into sharding.pipeline_microbatches={microbatches} micro-batches "
                         f"over {devices} batch devices; use rows a multiple of {max(microbatches, 1) * devices} or "
                         f"fewer micro-batches")


def _check_params(strategy: Strategy, mesh: Mesh, boxed_params: Any) -> None:
    """Raises for the first model-parallel dimension (in DIMENSIONS order) that does not divide."""
    rules = dict(_filter(strategy.model_rules, mesh))
    order = {name: i for i, name in enumerate(DIMENSIONS)}
    bad = []
    leaves = jax.tree_util.tree_leaves_with_path(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for path, leaf in leaves:
        for dim, size in zip(getattr(leaf, "names", None) or (), leaf.value.shape if hasattr(leaf, "value") else ()):
            axes = rules.get(dim)
            if axes is not None and size % axis_size(mesh, axes):
                bad.append((order.get(dim, len(order)), dim, size, axes, path, leaf.value.shape))
    if not bad:
        return
    _, dim, size, axes, path, shape = min(bad, key=lambda b: b[0])
    devices = axis_size(mesh, axes)
    divisors = [d for d in range(devices - 1, 0, -1) if size % d == 0 and mesh.size % d == 0]
    fix = f"--mesh={_mesh_with(strategy, mesh, axes, divisors[0])} or " if divisors else ""
    raise ValueError(
        f"strategy `{strategy.name}` cannot split `{dim}` ({DIMENSIONS.get(dim, dim)}) = {size} over mesh axis "
        f"`{axes}` of size {devices} (parameter {jax.tree_util.keystr(path, simple=True, separator='/')} of shape "
        f"{tuple(shape)}). Use {fix}a model whose `{dim}` is a multiple of {devices}")


def _mesh_with(strategy: Strategy, mesh: Mesh, axis: str, size: int) -> str:
    """`mesh` with `axis` resized to `size` and the first batch axis taking the rest (-1)."""
    shape = {**dict(mesh.shape), axis: size}
    rest = next(a for a in strategy.batch_axes if a != axis)
    shape[rest] = -1
    return ",".join(f"{a}={shape[a]}" for a in MESH_AXES if a in shape)


def _axes_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _present(axes: Sequence[str], mesh: Mesh | None):
    """The axes of `axes` that `mesh` has (None: all): None, one name, or a tuple of names."""
    kept = tuple(a for a in axes if mesh is None or a in mesh.shape)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else kept


def _filter(rules: Rules, mesh: Mesh | None) -> Rules:
    """`rules` with the mesh axes that `mesh` lacks removed (a rule left with none is dropped)."""
    out = []
    for name, axes in rules:
        kept = _present(_axes_tuple(axes), mesh)
        if kept is not None:
            out.append((name, kept))
    return tuple(out)
