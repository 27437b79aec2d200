"""Device meshes from a config string such as "data=-1" or "data=2,fsdp=2,tensor=2".

-1 on one axis means "all remaining devices". The mesh's axes are Auto (the compiler
propagates shardings from the constraints we give it).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DEFAULT_MESH = "data=-1"


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """"data=2,tensor=-1" -> {"data": 2, "tensor": num_devices // 2}; validates the product."""
    spec = spec or DEFAULT_MESH
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"mesh {spec!r}: each axis must be NAME=SIZE (e.g. data=-1,tensor=2)")
        if name in axes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
        try:
            axes[name] = int(size)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size of axis {name!r} must be an integer, got {size!r}") from None
    unknown = [n for n, s in axes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh {spec!r}: only one axis may be -1, got {unknown}")
    known = math.prod(s for s in axes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {spec!r}: {num_devices} devices do not divide by the fixed axes' product {known}")
        axes[unknown[0]] = num_devices // known
    if math.prod(axes.values()) != num_devices:
        raise ValueError(f"mesh {spec!r} has {math.prod(axes.values())} slots but there are {num_devices} devices")
    return axes


def make_mesh(spec: str = DEFAULT_MESH, devices: list | None = None) -> Mesh:
    """A mesh over `devices` (default: all of them, over all processes)."""
    devices = jax.devices() if devices is None else devices
    axes = parse_mesh(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(tuple(axes.values())), tuple(axes),
                axis_types=(AxisType.Auto,) * len(axes))
