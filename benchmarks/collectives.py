"""Collectives by hand against lax's, with the alpha-beta cost model, on simulated devices.

For each collective of `sharding.collectives` (ring all-reduce, bidirectional ring
all-reduce, reduce-scatter, all-gather, all-to-all; the 2-D hierarchical all-reduce on a
2 x 4 mesh), on axes of N devices and n bytes per device (float32; all-gather's n is the
gathered array, each device holding n / N), both ours (ppermute only) and the lax
collective are jitted over the mesh and measured side by side:

* HLO bytes: from the compiled HLO by `sharding.analysis.collectives`: ours, the bytes of its
  collective-permutes (what one device sends); lax, the parser's ring estimate (`wire_bytes`)
  of its one collective. Beside them the cost model's bytes (`collectives.cost(...).sent_bytes`).
* time: the median of --repeats calls after a warm-up call, ours and lax.
* model: alpha and beta fitted by least squares (relative error) to ours' times over all rows
  (`collectives.fit_alpha_beta`), and each row's predicted time alpha * steps + beta * bytes.

The "devices" are threads of one CPU process (XLA_FLAGS=--xla_force_host_platform_device_count=8)
and a ppermute is a memory copy, so alpha here is XLA's per-op dispatch and synchronisation and
beta the copy speed: the fitted numbers describe this simulation, not a network. What carries
over to real hardware is the byte count and the number of steps.

Run:
  python benchmarks/collectives.py
  python benchmarks/collectives.py --quick      # N = 4 and 8 and 2x4, 4 KiB and 256 KiB, 3 timed calls
"""

import argparse
import os
import pathlib
import sys
import time

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from sharding import analysis
from sharding import collectives as coll

HIERARCHICAL = "hierarchical_all_reduce"
LAX_KIND = {"ring_all_reduce": "all-reduce", "bidirectional_all_reduce": "all-reduce", HIERARCHICAL: "all-reduce",
            "reduce_scatter": "reduce-scatter", "all_gather": "all-gather", "all_to_all": "all-to-all"}


def _cases(name: str, sizes: list[int]) -> list[tuple]:
    """(mesh axes, axis names, ours, lax) of collective `name` for each N in `sizes`."""
    if name == HIERARCHICAL:
        axes = {"outer": 2, "inner": 4}
        return [(axes, ("outer", "inner"), lambda x, o, i: coll.hierarchical_all_reduce(x, i, o),
                 lambda x, o, i: lax.psum(x, (o, i)))]
    ours, ref = coll.COLLECTIVES[name]
    return [({"data": n}, ("data",), ours, ref) for n in sizes]


def _hlo_bytes(fn, xs) -> dict:
    ops = analysis.summarize(analysis.collectives(fn.lower(xs).compile().as_text()))
    return {kind: entry for kind, entry in ops.items() if entry["count"]}


def _median_seconds(fn, xs, repeats: int) -> float:
    jax.block_until_ready(fn(xs))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(xs))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(name: str, axes: dict, names: tuple, ours, ref, nbytes: int, repeats: int) -> dict:
    """One row: HLO bytes, model cost and times of ours and lax for `nbytes` per device."""
    n = int(np.prod(list(axes.values())))
    elements = nbytes // 4 // (n if name == "all_gather" else 1)
    mesh = coll.mesh_of(axes)
    xs = np.random.default_rng(0).standard_normal((*axes.values(), elements)).astype(np.float32)
    xs = jax.device_put(xs, NamedSharding(mesh, PartitionSpec(*names)))
    fns = {"ours": coll.per_device(ours, mesh, names), "lax": coll.per_device(ref, mesh, names)}
    sizes = tuple(axes.values()) if name == HIERARCHICAL else n
    model = coll.cost(name, coll.padded_bytes(name, (elements,), 4, sizes), sizes)
    hlo = {label: _hlo_bytes(fn, xs) for label, fn in fns.items()}
    return {"collective": name, "N": "x".join(map(str, axes.values())), "bytes": nbytes, "cost": model,
            "hlo_ours": hlo["ours"].get("collective-permute", {}).get("bytes", 0),
            "hlo_ours_kinds": sorted(hlo["ours"]),
            "hlo_lax": hlo["lax"].get(LAX_KIND[name], {}).get("wire_bytes", 0.0),
            "seconds_ours": _median_seconds(fns["ours"], xs, repeats),
            "seconds_lax": _median_seconds(fns["lax"], xs, repeats)}


def print_table(rows: list[dict], alpha: float, beta: float) -> None:
    header = (f"{'collective':26s} {'N':>4s} {'n bytes':>9s} {'HLO ours':>10s} {'HLO lax':>10s} {'model':>10s} "
              f"{'ours ms':>8s} {'lax ms':>8s} {'model ms':>8s} {'ours/lax':>8s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['collective']:26s} {r['N']:>4s} {r['bytes']:9d} {r['hlo_ours']:10.0f} {r['hlo_lax']:10.0f} "
              f"{r['cost'].sent_bytes:10.0f} {1e3 * r['seconds_ours']:8.3f} {1e3 * r['seconds_lax']:8.3f} "
              f"{1e3 * r['cost'].time(alpha, beta):8.3f} {r['seconds_ours'] / r['seconds_lax']:8.2f}")
    print(f"fit to ours' times: alpha = {1e6 * alpha:.1f} us per step, beta = {1e9 * beta:.3f} ns per byte "
          f"({1e-9 / beta if beta > 0 else float('inf'):.2f} GB/s)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 4, 8 and 2x4, two sizes (also LMLAB_QUICK=1)")
    parser.add_argument("--sizes", default="4096,262144,4194304", help="bytes per device, comma-separated")
    parser.add_argument("--devices", default="2,4,8", help="axis sizes N, comma-separated")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("LMLAB_QUICK") == "1"
    nbytes_list = [4096, 262144] if quick else [int(s) for s in args.sizes.split(",")]
    devices = [4, 8] if quick else [int(s) for s in args.devices.split(",")]
    repeats = 3 if quick else args.repeats
    if max(devices) > jax.device_count() or jax.device_count() < 8:
        raise SystemExit(f"error: need {max(8, *devices)} devices, have {jax.device_count()}; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts")
    rows = []
    for name in (*coll.COLLECTIVES, HIERARCHICAL):
        for axes, names, ours, ref in _cases(name, devices):
            for nbytes in nbytes_list:
                rows.append(measure(name, axes, names, ours, ref, nbytes, repeats))
    alpha, beta = coll.fit_alpha_beta([r["cost"] for r in rows], [r["seconds_ours"] for r in rows])
    print_table(rows, alpha, beta)
    # lax's collective is one op, not one per step: its fit says what XLA's own algorithm costs
    # per (model) step and byte, for comparison.
    lax_alpha, lax_beta = coll.fit_alpha_beta([r["cost"] for r in rows], [r["seconds_lax"] for r in rows])
    print(f"fit to lax's times:  alpha = {1e6 * lax_alpha:.1f} us per step, beta = {1e9 * lax_beta:.3f} ns per byte")
    ratios = [r["seconds_ours"] / r["cost"].time(alpha, beta) for r in rows]
    print(f"ours measured / predicted: median {np.median(ratios):.2f}, range {min(ratios):.2f} .. {max(ratios):.2f}")
    return {"rows": rows, "alpha": alpha, "beta": beta, "lax_alpha": lax_alpha, "lax_beta": lax_beta}


if __name__ == "__main__":
    main()
