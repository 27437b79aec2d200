"""train/checkpoint.py across 2 processes x 2 CPU devices (gloo): the primary process writes each
step's manifest after the save completes while the other waits, and a corrupt step found by
the primary is moved aside once, with both processes falling back to the same earlier step."""

import os
import socket
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = textwrap.dedent("""
    import sys
    import jax
    pid, port, directory, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    import numpy as np
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from train.checkpoint import Checkpointer

    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))

    def values(seed):
        return np.random.default_rng(seed).standard_normal((256, 256)).astype(np.float32)

    def state(seed):
        return {"w": jax.make_array_from_callback((256, 256), sharding, lambda index: values(seed)[index])}

    if phase == "save":
        with Checkpointer(directory, save_interval_steps=10) as ckpt:  # async: manifests after commit
            ckpt.save(10, state(10), data_state={"position": 10}, config={})
            ckpt.save(20, state(20), data_state={"position": 20}, config={})
    else:
        abstract = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=sharding)}
        with Checkpointer(directory, save_interval_steps=10) as ckpt:
            step, restored, data_state, _ = ckpt.restore(abstract)
        for shard in restored["w"].addressable_shards:  # only this process's shards
            np.testing.assert_array_equal(np.asarray(shard.data), values(step)[shard.index])
        print("RESTORED", step, data_state["position"])
""")


def _run_both(directory, phase):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(port), str(directory), phase], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def test_two_processes_write_manifests_and_fall_back_together(tmp_path):
    _run_both(tmp_path, "save")
    for step in ("10", "20"):
        assert (tmp_path / step / "lmlab_manifest.json").is_file()
    chunks = sorted((p for p in (tmp_path / "20" / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                    key=lambda p: -p.stat().st_size)
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    chunks[0].write_bytes(bytes(data))

    outs = _run_both(tmp_path, "restore")
    assert all("RESTORED 10 10" in out for out in outs), outs  # found by the manifest
    assert not (tmp_path / "20").exists()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("corrupt.step_20.")]) == 1
