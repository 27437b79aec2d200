"""Where a trainer step's time goes: the ops of one compiled train step by kind, from a jax.profiler trace.

The step is the trainer's own (`train.program.build`, as benchmarks/train_throughput.py builds
it) for a LLaMA of the given width (the shapes of benchmarks/vs_transformers.py: B = 8,
T = 256, V = 4096, 8 heads, 4 kv heads). It is compiled, run under `jax.profiler.trace`, and
each op event of the step's module in the trace (the thunks XLA's CPU runtime records, with
their `hlo_op` name) is matched to its instruction in the optimized HLO
(`compiled.as_text()`) and classified:

  matmul     a dot or convolution, or a fusion around one (YNNPACK's dot fusions)
  fusion     an elementwise fusion (norms, activations, softmax pieces, optimizer updates)
  copy       copy / transpose, or a fusion of only data movement (layout changes)
  reduce     a reduction, or a fusion ending in one
  gather     scatter / gather / dynamic-slice / dynamic-update-slice, or a fusion holding one
  other      the rest

It prints milliseconds per step and the share of each kind (of the summed op time, which can
exceed wall time when XLA runs independent ops at once), then the 10 costliest ops with their
output shapes and the JAX operation they come from.

Run:
  python benchmarks/profile_step.py                  # width 512, 8 layers
  python benchmarks/profile_step.py --width=256 --steps=5
  python benchmarks/profile_step.py --quick          # tiny sizes (the test)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import pathlib
import re
import sys
import tempfile
import time

import jax
import optax

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.train_throughput import synthetic_batch
from models.gpt import GPT, llama_config
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from sharding.strategies import get_strategy
from train import program as program_lib

KINDS = ("matmul", "fusion", "copy", "reduce", "gather", "other")
_MATMUL = {"dot", "convolution"}
_COPY = {"copy", "transpose"}
_MOVE = _COPY | {"bitcast", "reshape", "broadcast", "parameter", "constant", "slice", "concatenate", "pad",
                 "tuple", "get-tuple-element"}
_GATHER = {"scatter", "gather", "dynamic-slice", "dynamic-update-slice"}
_REDUCE = {"reduce", "reduce-window"}
# `  [ROOT] %name = shape opcode(operands), attributes`; a tuple shape is parenthesized.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([a-z][\w\-]*)\((.*)$")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: its opcode, output shape, called computations and JAX op name."""

    opcode: str
    shape: str
    calls: tuple[str, ...]
    op_name: str


def parse_hlo(text: str) -> dict[str, dict[str, Instruction]]:
    """computation name -> {instruction name -> Instruction} of an HLO module's text."""
    computations: dict[str, dict[str, Instruction]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            if line.endswith("{") and line[:1] not in (" ", ""):  # `[ENTRY ]%name (params) -> shape {`
                current = computations.setdefault(line.removeprefix("ENTRY ").split()[0].lstrip("%"), {})
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            name, shape, opcode, rest = m.groups()
            calls = tuple(c.lstrip("%") for c in re.findall(r"(?:calls|to_apply|body|condition)=(%?[\w.\-]+)", rest))
            op_name = re.search(r'op_name="([^"]*)"', rest)
            current[name] = Instruction(opcode, shape, calls, op_name.group(1) if op_name else "")
    return computations


def _opcodes(computation: str, computations, seen=None) -> set[str]:
    """Every opcode inside `computation` and the computations it calls (reducers excluded)."""
    seen = set() if seen is None else seen
    if computation in seen or computation not in computations:
        return set()
    seen.add(computation)
    out = set()
    for ins in computations[computation].values():
        out.add(ins.opcode)
        if ins.opcode in ("fusion", "call", "while", "conditional"):
            for c in ins.calls:
                out |= _opcodes(c, computations, seen)
    return out


def classify(instruction: Instruction, computations) -> str:
    """The kind (one of KINDS) of an instruction of the entry computation."""
    ops = {instruction.opcode}
    if instruction.opcode in ("fusion", "call"):
        ops = set().union(*(_opcodes(c, computations) for c in instruction.calls)) or ops
    if ops & _MATMUL:
        return "matmul"
    if ops & _GATHER:
        return "gather"
    if ops & _REDUCE:
        return "reduce"
    if ops <= _MOVE and ops & (_COPY | {"slice", "concatenate", "pad", "broadcast"}):
        return "copy"
    if instruction.opcode == "fusion":
        return "fusion"
    return "other"


def op_times(trace_dir: str, module: str) -> dict[str, float]:
    """hlo op name -> summed nanoseconds of its events in the trace for HLO module `module`."""
    from jax.profiler import ProfileData

    totals: dict[str, float] = collections.defaultdict(float)
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if stats.get("hlo_module") == module and "hlo_op" in stats:
                        totals[stats["hlo_op"]] += event.duration_ns
    return totals


def trainer_step(width: int, layers: int, batch: int, seq_len: int, vocab: int):
    """(the trainer's program, its initial state, a synthetic batch placed for it, an rng)."""
    d_ff = 64 * round(8 * width / 3 / 64)
    model = GPT(llama_config(vocab_size=vocab, d_model=width, num_layers=layers, num_heads=8, num_kv_heads=4,
                             d_ff=d_ff, max_len=seq_len))
    tx = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])
    program = program_lib.build(model, tx, optax.constant_schedule(3e-4), strategy=get_strategy("dp"), mesh=mesh,
                                seq_len=seq_len)
    placed = rules_lib.device_put_batch(synthetic_batch(batch, seq_len, vocab), program.layout.batch)
    return program, program.init(jax.random.key(0)), placed, jax.random.key(1)


def profile(width: int, layers: int, batch: int, seq_len: int, vocab: int, steps: int) -> dict:
    """Profiles `steps` trainer steps (after one untimed). Returns {"kinds": {kind: ms per step},
    "ops": [(name, kind, ms per step, shape, jax op name)] costliest first, "module": name,
    "wall_ms": wall time per step under the profiler}."""
    program, state, placed, rng = trainer_step(width, layers, batch, seq_len, vocab)
    return profile_compiled(program.step.lower(state, placed, rng).compile(), state, placed, rng, steps)


def profile_compiled(compiled, state, placed, rng, steps: int) -> dict:
    """`profile` of any compiled step(state, batch, rng) -> (state, metrics), e.g. another
    configuration of the trainer's program (colabs/12_performance.ipynb: with and without remat)."""
    text = compiled.as_text()
    module = text.split()[1].rstrip(",")
    computations = parse_hlo(text)
    entry = {}
    for instructions in computations.values():  # names are unique within a module
        entry.update(instructions)
    state, metrics = compiled(state, placed, rng)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, placed, rng)
            jax.block_until_ready((state, metrics))
            wall_ms = (time.perf_counter() - start) * 1e3 / steps
        times = op_times(trace_dir, module)
    if not times:
        raise RuntimeError(f"the trace holds no op events of module {module!r}")
    kinds = dict.fromkeys(KINDS, 0.0)
    ops = []
    for name, ns in times.items():
        ins = entry.get(name, Instruction("unknown", "", (), ""))
        kind = classify(ins, computations) if name in entry else "other"
        kinds[kind] += ns / 1e6 / steps
        ops.append((name, kind, ns / 1e6 / steps, ins.shape, ins.op_name))
    ops.sort(key=lambda o: -o[2])
    return {"kinds": kinds, "ops": ops, "module": module, "wall_ms": wall_ms}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512, help="d_model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one untimed)")
    parser.add_argument("--top", type=int, default=10, help="costliest ops listed")
    parser.add_argument("--quick", action="store_true", help="width 64, 2 layers, B2 T32 V512, 1 step")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.batch, args.seq_len, args.vocab, args.steps = 64, 2, 2, 32, 512, 1
    if args.width % 8 or min(args.width, args.layers, args.batch, args.seq_len, args.vocab, args.steps) < 1:
        parser.error("--width must be a positive multiple of 8 (8 heads); the other sizes and --steps >= 1")

    r = profile(args.width, args.layers, args.batch, args.seq_len, args.vocab, args.steps)
    total = sum(r["kinds"].values())
    print(f"trainer step of a LLaMA {args.layers} layers x {args.width}, B={args.batch} T={args.seq_len} "
          f"V={args.vocab}, float32 ({r['module']}); {args.steps} profiled steps: op time per step "
          f"{total:.1f} ms (summed over ops, which may overlap), wall {r['wall_ms']:.1f} ms\n")
    print(f"{'kind':8} {'ms/step':>9} {'share':>7}")
    for kind in KINDS:
        print(f"{kind:8} {r['kinds'][kind]:9.2f} {r['kinds'][kind] / total:7.1%}")
    print(f"\n{'top op':28} {'kind':7} {'ms/step':>8} {'share':>6}  shape / from")
    for name, kind, ms, shape, op_name in r["ops"][:args.top]:
        print(f"{name[:28]:28} {kind:7} {ms:8.2f} {ms / total:6.1%}  {shape[:40]} {op_name[-70:]}")
    return r


if __name__ == "__main__":
    main()
