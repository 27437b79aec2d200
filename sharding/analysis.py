"""Memory and communication of a sharded train step: measured, compiled and analytical.

Memory, per device:
  * `sharded_bytes`: from shardings, the bytes of one device's shards of a tree (what
    `Array.addressable_shards` hold, computable before anything is allocated);
  * `state_bytes`: parameters, gradients and optimizer state of a Layout;
  * `compiled_memory`: XLA's buffer assignment of the compiled step
    (`compiled.memory_analysis()`: arguments, outputs, aliased (donated) bytes, temporaries);
  * `zero_bytes`: the ZeRO paper's formulas (Rajbhandari et al. 2020, sec. 3 and Table 1)
    for Ψ parameters on N devices. Mixed-precision Adam keeps 2Ψ of fp16 parameters,
    2Ψ of fp16 gradients and K = 12 bytes per parameter of fp32 master weights, momentum
    and variance:  DP 16Ψ, ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N.
    lmlab stores float32 parameters (bf16 only in compute) and Adam's m and v, so it follows
    the f32 column: 4Ψ + 4Ψ + 8Ψ:  DP 16Ψ, ZeRO-1 8Ψ + 8Ψ/N, ZeRO-2 4Ψ + 12Ψ/N, ZeRO-3 16Ψ/N.

Communication: `collectives` parses the compiled HLO text (`compiled.as_text()`) and lists
every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute (and their
async `-start` forms; the `-done` halves are not counted again). The count is static: an op
inside a loop body (a scanned layer stack, gradient accumulation) counts once. Bytes are
those of the op's RESULT shape (for all-gather the gathered array, for reduce-scatter the
scattered shard, for an all-reduce the reduced array), summed over tuple results. Beside
them `wire_bytes` estimates what one device sends with ring algorithms over a group of n:
all-reduce 2 (n-1)/n S, all-gather (n-1)/n S, reduce-scatter (n-1) S (S its result),
all-to-all (n-1)/n S, collective-permute S.

On the CPU backend XLA never emits reduce-scatter: a gradient summed and then kept only in
slices comes out as an all-reduce whose users each read their device's slice (GPU and TPU
compilers rewrite that pair into a reduce-scatter). `Collective.scattered_bytes` counts such
results; `summarize` adds them up apart.

Theory (`communication_theory`): the ZeRO paper's volumes per device per step, in elements:
DP 2Ψ (reduce-scatter + all-gather of the gradients, i.e. one all-reduce), ZeRO-1 and -2 2Ψ,
ZeRO-3 3Ψ (parameters all-gathered for the forward and again for the backward, gradients
reduce-scattered), each times (N-1)/N. Megatron tensor parallelism: 2 all-reduces of the
[B, T, D] activations per layer in the forward pass and 2 in the backward.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np

from sharding.layout import Layout
from sharding.strategies import STAGE, TENSOR, axis_size

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Bytes per parameter: (params, grads, optimizer state).
PRECISIONS = {"mixed": (2, 2, 12), "f32": (4, 4, 8)}
ZERO_STAGES = {"dp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s(?P<op>[\w\-]+)\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]")


# ----------------------------------------------------------------------------- memory


def sharded_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of `tree` (arrays, or shape structs with `shardings` or their own
    `.sharding`): the largest per-device total over the devices."""
    leaves = jax.tree_util.tree_leaves(tree)
    sharding_leaves = (jax.tree_util.tree_leaves(shardings) if shardings is not None
                       else [getattr(x, "sharding", None) for x in leaves])
    per_device: dict[Any, int] = collections.Counter()
    for leaf, sharding in zip(leaves, sharding_leaves, strict=True):
        itemsize = np.dtype(leaf.dtype).itemsize
        if sharding is None:
            per_device[None] += math.prod(leaf.shape) * itemsize
            continue
        shard = math.prod(sharding.shard_shape(tuple(leaf.shape))) * itemsize
        for device in sharding.device_set:
            per_device[device] += shard
    return max(per_device.values(), default=0)


def addressable_bytes(tree: Any) -> int:
    """Bytes one device actually holds of a tree of arrays (its `addressable_shards`): the
    largest per-device total."""
    per_device: dict[Any, int] = collections.Counter()
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return max(per_device.values(), default=0)


def state_bytes(layout: Layout, abstract_state: Any) -> dict[str, int]:
    """Per-device bytes of params, grads (float32 like the params) and optimizer state under
    `layout`, from the shardings (`abstract_state`: the unboxed state's shapes)."""
    return {
        "params": sharded_bytes(abstract_state.params, layout.state.params),
        "grads": sharded_bytes(abstract_state.params, layout.grads),
        "opt_state": sharded_bytes(abstract_state.opt_state, layout.state.opt_state),
    }


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's per-device buffer sizes of a compiled step (`jax.stages.Compiled`), and
    `peak` = arguments + outputs - aliased + temporaries (what must fit at once)."""
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
           "temp": m.temp_size_in_bytes, "generated_code": m.generated_code_size_in_bytes}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def zero_bytes(num_params: float, num_devices: int, stage: int | str, precision: str = "mixed") -> dict[str, float]:
    """The ZeRO paper's per-device bytes of params, grads and optimizer state, and their total.

    Args:
      num_params: Ψ.
      num_devices: N, the data-parallel degree the state is split over.
      stage: 0-3, or a strategy name in ZERO_STAGES ("dp", "zero1", "zero2", "zero3", "fsdp").
      precision: "mixed" (fp16 params and grads, K = 12 of fp32 Adam state) or "f32".
    """
    stage = ZERO_STAGES[stage] if isinstance(stage, str) else stage
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {tuple(PRECISIONS)}")
    p, g, k = PRECISIONS[precision]
    out = {"params": p * num_params / (num_devices if stage >= 3 else 1),
           "grads": g * num_params / (num_devices if stage >= 2 else 1),
           "opt_state": k * num_params / (num_devices if stage >= 1 else 1)}
    out["total"] = out["params"] + out["grads"] + out["opt_state"]
    return out


def analytic_state_bytes(layout: Layout, num_params: float, precision: str = "f32",
                         staged: float = 0.0) -> dict[str, float]:
    """`zero_bytes` for the layout's strategy: N = the devices the ZeRO state is split over,
    everything further divided by the tensor-parallel degree (every weight but the norms is
    split over `tensor`). Under pipeline parallelism the `staged` parameters (the stacked
    layers, `staged_params`) count 1 / stages: each stage holds its own layers, every stage the
    rest (embedding, head). Expert parallelism is not modelled (its experts' share varies)."""
    strategy, mesh = layout.strategy, layout.mesh
    zero_devices = axis_size(mesh, tuple(a for a in strategy.zero_axes if a in mesh.shape))
    tensor = mesh.shape[TENSOR] if TENSOR in strategy.mesh_axes and TENSOR in mesh.shape else 1
    stages = mesh.shape[STAGE] if STAGE in strategy.mesh_axes and STAGE in mesh.shape else 1
    held = num_params - staged + staged / stages
    return {k: v / tensor for k, v in zero_bytes(held, zero_devices, strategy.zero_stage, precision).items()}


def staged_params(layout: Layout, abstract_params: Any) -> int:
    """Parameters in the leaves the layout splits over the `stage` mesh axis (the stacked layers
    of a pipeline strategy; 0 without one)."""
    def staged(sharding) -> bool:
        return any(STAGE in ((entry,) if isinstance(entry, str) else tuple(entry or ())) for entry in sharding.spec)

    return sum(math.prod(leaf.shape) for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract_params),
                                                              jax.tree_util.tree_leaves(layout.state.params))
               if staged(sharding))


def pipeline_activation_bytes(*, stages: int, microbatches: int, num_layers: int, rows: int, seq_len: int,
                              d_model: int, bytes_per_element: int = 4) -> dict[str, float]:
    """What a GPipe stage keeps for its backward pass, per device, as layer inputs ([b, T, D] per
    layer and tick; `models.layers.pipeline`): the tick loop saves every one of its M + S - 1
    ticks (S - 1 of them the bubble's placeholders), for each of the stage's L / S layers. With
    remat "full" that is all a layer keeps; otherwise a lower bound (a layer keeps more inside).

    Args:
      stages, microbatches: S and M.
      num_layers: L.
      rows: rows of one micro-batch on one device (step rows / M / batch devices).
      seq_len, d_model: T and D.
      bytes_per_element: of the compute dtype.

    Returns:
      in_flight_ticks (M + S - 1), bubble ((S - 1) / (M + S - 1)) and layer_input_bytes.
    """
    ticks = microbatches + stages - 1
    return {"in_flight_ticks": ticks, "bubble": (stages - 1) / ticks,
            "layer_input_bytes": ticks * (num_layers // stages) * rows * seq_len * d_model * bytes_per_element}


# ----------------------------------------------------------------------- communication


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled HLO module.

    Attributes:
      kind: one of KINDS.
      name: the instruction's name.
      bytes: bytes of its result (see the module docstring).
      group_size: devices in each replica group (n).
      wire_bytes: bytes one device sends, by the ring estimate.
      phase: "forward", "backward" or "other" (optimizer, loss), from the op's metadata.
      scattered_bytes: of an all-reduce, the bytes of its result that every reader slices by
        device (a reduce-scatter on GPU and TPU, see the module docstring).
    """

    kind: str
    name: str
    bytes: int
    group_size: int
    wire_bytes: float
    phase: str
    scattered_bytes: int = 0


def collectives(compiled_or_text) -> list[Collective]:
    """The collectives of a compiled step (a `jax.stages.Compiled` or its `as_text()`)."""
    text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    num_partitions = int(m.group(1)) if (m := re.search(r"num_partitions=(\d+)", text)) else 1
    instructions, users = {}, collections.defaultdict(list)
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        instructions[match["name"]] = match
        for operand in re.findall(r"%([\w.\-]+)", match["rest"].split("metadata=")[0]):
            users[operand].append(match["name"])
    found = []
    for name, match in instructions.items():
        op = match["op"]
        kind = op.removesuffix("-start")
        if kind not in KINDS:
            continue
        result = _result_arrays(match["type"], async_pair=op.endswith("-start") and kind in ("all-gather",
                                                                                              "collective-permute"))
        size = int(sum(_array_bytes(a) for a in result))
        n = _group_size(match["rest"], num_partitions)
        found.append(Collective(
            kind=kind, name=name, bytes=size, group_size=n, wire_bytes=_wire_bytes(kind, size, n),
            phase=_phase(match["rest"]),
            scattered_bytes=_scattered_bytes(name, result, instructions, users) if kind == "all-reduce" else 0))
    return found


def summarize(ops: list[Collective]) -> dict[str, dict[str, float]]:
    """Per kind: count, bytes and wire_bytes; all-reduces also `scattered_count` and `scattered_bytes`."""
    out = {kind: {"count": 0, "bytes": 0, "wire_bytes": 0.0} for kind in KINDS}
    out["all-reduce"].update(scattered_count=0, scattered_bytes=0)
    for op in ops:
        entry = out[op.kind]
        entry["count"] += 1
        entry["bytes"] += op.bytes
        entry["wire_bytes"] += op.wire_bytes
        if op.scattered_bytes:
            entry["scattered_count"] += 1
            entry["scattered_bytes"] += op.scattered_bytes
    return out


def communication_theory(strategy: str, num_params: float, num_devices: int, bytes_per_element: int = 4) -> float:
    """The ZeRO paper's bytes one device sends per step for `strategy` in ZERO_STAGES:
    2Ψ elements (DP, ZeRO-1, ZeRO-2) or 3Ψ (ZeRO-3, FSDP), times (N-1)/N."""
    stage = ZERO_STAGES[strategy]
    elements = (3 if stage == 3 else 2) * num_params
    return elements * bytes_per_element * (num_devices - 1) / num_devices


def megatron_all_reduces(num_layers: int) -> dict[str, int]:
    """All-reduces of a Megatron tensor-parallel stack of `num_layers` layers: forward (after
    the attention output and the MLP down projection) and backward (before the
    column-parallel q/k/v and MLP input projections: their input gradients)."""
    return {"forward": 2 * num_layers, "backward": 2 * num_layers}


def _result_arrays(type_text: str, *, async_pair: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of the arrays of an HLO result type; of the output half for an async
    all-gather / collective-permute start, whose result is (operands, outputs, ...)."""
    type_text = re.sub(r"/\*.*?\*/", "", type_text)
    if async_pair:
        parts = _top_level(type_text)
        type_text = parts[1] if len(parts) > 1 else type_text
    return [(a["dtype"], tuple(int(d) for d in a["dims"].split(",") if d)) for a in _ARRAY.finditer(type_text)]


def _top_level(type_text: str) -> list[str]:
    """The top-level elements of a tuple type "(a, (b, c), d)"."""
    inner = type_text.strip()
    if not inner.startswith("("):
        return [inner]
    inner, parts, depth, start = inner[1:-1], [], 0, 0
    for i, ch in enumerate(inner):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    return parts + [inner[start:]]


def _array_bytes(array: tuple[str, tuple[int, ...]]) -> float:
    dtype, dims = array
    return DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0) * math.prod(dims)


def _group_size(rest: str, num_partitions: int) -> int:
    """Devices per replica group, from any of XLA's three printed forms."""
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", rest):          # {{0,1},{2,3}}
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[[\d,]*?(\d+)\]<=", rest):       # [4,2]<=[8]: 4 groups of 2
        return int(m.group(1))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest):  # mesh['a'=4,'b'=2] {'b'}
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    return num_partitions                                                 # {} or source_target_pairs


def _wire_bytes(kind: str, size: float, n: int) -> float:
    if kind == "collective-permute":
        return float(size)
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n * size, "all-gather": (n - 1) / n * size,
            "reduce-scatter": (n - 1) * size, "all-to-all": (n - 1) / n * size}[kind]


def _phase(rest: str) -> str:
    op_name = m.group(1) if (m := re.search(r'op_name="([^"]*)"', rest)) else ""
    if "transpose(" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "other"


def _scattered_bytes(name: str, arrays: list, instructions: dict, users: dict) -> int:
    """Bytes of the elements of all-reduce `name`'s result that every reader slices by partition
    id (a tuple result is read element by element, through get-tuple-element)."""

    def by_partition(reader) -> bool:
        operands = re.findall(r"%([\w.\-]+)", reader["rest"].split("metadata=")[0])
        return any(instructions[o]["op"] == "partition-id" for o in operands if o in instructions)

    def sliced(readers) -> bool:
        return bool(readers) and all(r["op"] == "dynamic-slice" or by_partition(r) for r in readers)

    if len(arrays) == 1:
        return int(_array_bytes(arrays[0])) if sliced([instructions[u] for u in users.get(name, ())]) else 0
    total = 0
    for user in users.get(name, ()):
        gte = instructions[user]
        if gte["op"] != "get-tuple-element":
            return 0
        index = int(re.search(r"index=(\d+)", gte["rest"]).group(1))
        if sliced([instructions[u] for u in users.get(user, ())]):
            total += int(_array_bytes(arrays[index]))
    return total
