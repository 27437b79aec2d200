"""Multi-process runs: joining `jax.distributed`, barriers, lead-only work, agreement, host copies.

Every process of a multi-host job runs the same `python -m train` command. `initialize` joins
them (explicit flags, or the cluster JAX detects: SLURM, TPU pods, Kubernetes, Open MPI)
before anything else touches a device; afterwards `jax.devices()` lists every process's
devices and the trainer's mesh spans them all.

Host-side coordination goes through the coordination service `jax.distributed` starts in
process 0 (a key-value store and barriers, RPCs that never wait behind a device's queue):

    lead_first(name, fn)         the lead runs fn (prepares data, trains the tokenizer), the
                                 others wait at a barrier, then run fn (and read what it wrote)
    any_process(flag, name, i)   True on every process if any process passed True at round i:
                                 how all processes agree to stop after the same step on SIGTERM
    to_host(tree)                numpy copies of arrays that may span processes

With one process (no `jax.distributed`) each of them is its plain single-process self.

Why not JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`)? Its
counter starts at 0 and the agreed point is the largest step reported + 1, so a notice that
arrives before a resumed run's first call sets a point the run has already passed; and orbax
calls it too, with its own step numbers, from its save and background finalize threads.
`any_process` has no such state: round d's answer is decided by round d's barrier.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")

FLAG_NAMES = ("coordinator_address", "num_processes", "process_id")
# A barrier waits for the slowest process: data preparation and tokenizer training can take
# hours on a real corpus. A process that dies is caught sooner, by the coordination service's
# heartbeats (jax.distributed's heartbeat_timeout_seconds), which fail the barrier.
LONG_TIMEOUT_S = 24 * 3600
KEY_PREFIX = "lmlab"


class DistributedError(ValueError):
    """The distributed flags are inconsistent; the message names the problem and the fix."""


class LeadFailed(RuntimeError):
    """The lead process failed in work the others wait for (`lead_first`)."""


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port), or DistributedError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator_address={address!r} is not HOST:PORT (e.g. 10.0.0.1:1234: process "
                               "0's host and a free port, 1-65535)")
    return host, int(port)


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> bool:
    """Validates the three flags; returns whether they were given (all three) or not (none).

    Raises:
        DistributedError: only some were given, or their values are impossible.
    """
    values = dict(zip(FLAG_NAMES, (coordinator_address, num_processes, process_id)))
    given = [k for k, v in values.items() if v is not None]
    if not given:
        return False
    if len(given) < len(FLAG_NAMES):
        missing = [f"--{k}" for k in FLAG_NAMES if k not in given]
        raise DistributedError(f"--{given[0]} needs {' and '.join(missing)} too: a multi-process run gives all of "
                               "--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or none, to let "
                               "JAX detect a SLURM, TPU or Kubernetes cluster)")
    parse_address(coordinator_address)
    if num_processes < 1:
        raise DistributedError(f"--num_processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id} must lie in [0, {num_processes - 1}] "
                               f"(--num_processes={num_processes}; process 0 hosts the coordinator)")
    return True


def detect_cluster() -> str | None:
    """The cluster environment JAX would join with `jax.distributed.initialize()`, when it holds
    more than one process (a one-task SLURM job or a single-host TPU VM needs no coordinator)."""
    from jax._src import clusters  # JAX's own registry, so we detect exactly what it would join

    for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001 - the registry initialize() reads
        if env.opt_in_only_method:  # mpi4py: only when asked for by name
            continue
        try:
            present = env.is_env_present()
        except Exception as e:  # noqa: BLE001 - e.g. Kubernetes without in-cluster credentials
            log.warning("cannot tell whether this is a %s job: %s", env.__name__, e)
            continue
        if not present:
            continue
        # The first cluster present is the one initialize() would join (as in JAX's detection).
        try:
            return env.__name__ if env.get_process_count() > 1 else None
        except Exception:  # noqa: BLE001 - half-configured: let initialize() say what is missing
            return env.__name__
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str | None:
    """Joins `jax.distributed` when asked to (all three flags) or when a cluster is detected.

    Call it before anything else touches a device. JAX's preemption service is turned off: the
    trainer agrees on a stop step itself (`any_process`) and keeps its own SIGTERM handler.

    Returns:
        How the job was joined ('flags' or the cluster's name), or None for one process.

    Raises:
        DistributedError: inconsistent flags, or the join failed (one line, naming why).
    """
    explicit = check_flags(coordinator_address, num_processes, process_id)
    how = "flags" if explicit else detect_cluster()
    if how is None:
        return None
    jax.config.update("jax_enable_preemption_service", False)
    try:
        if explicit:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
        else:
            jax.distributed.initialize()
    except Exception as e:  # noqa: BLE001 - jaxlib's connection errors: say which join failed, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedError(f"could not join the job ({how}): {first}; check that process 0 runs and that "
                               "every process got the same --coordinator_address and --num_processes") from e
    log.info("joined the job (%s) as process %d of %d", how, jax.process_index(), jax.process_count())
    return how


def is_lead() -> bool:
    """Whether this process writes the run's shared files (config, metrics, summary)."""
    return jax.process_index() == 0


def _client():
    from jax._src import distributed as jax_distributed  # the client jax.distributed connected

    return jax_distributed.global_state.client


def _multi_process() -> bool:
    return jax.process_count() > 1 and _client() is not None


def barrier(name: str, timeout_s: float = LONG_TIMEOUT_S) -> None:
    """Waits until every process has reached the barrier `name` (nothing with one process)."""
    if _multi_process():
        _client().wait_at_barrier(f"{KEY_PREFIX}/{name}", int(timeout_s * 1000))


def lead_first(name: str, fn: Callable[[], T]) -> T:
    """Runs `fn` on the lead, then (after a barrier) on the other processes; returns its result.

    For work whose result is written to shared files: the lead writes, the others read. When
    `fn` fails on the lead, the others stop at once too (`LeadFailed`), instead of waiting.
    """
    if not is_lead():
        barrier(f"{name}/lead_done")
        failure = _try_get(f"{name}/lead_failed")
        if failure is not None:
            raise LeadFailed(f"process 0 failed ({name}), so this process stops too: {failure}")
        return fn()
    try:
        result = fn()
    except Exception as e:
        if _multi_process():
            first = (str(e).strip().splitlines() or [""])[0]
            _client().key_value_set(f"{KEY_PREFIX}/{name}/lead_failed", f"{type(e).__name__}: {first}",
                                    allow_overwrite=True)
            barrier(f"{name}/lead_done")
        raise
    barrier(f"{name}/lead_done")
    return result


def _try_get(name: str) -> str | None:
    try:
        return _client().key_value_try_get(f"{KEY_PREFIX}/{name}")
    except Exception:  # noqa: BLE001 - jaxlib raises JaxRuntimeError(NOT_FOUND) for a missing key
        return None


def any_process(flag: bool, name: str, round_index: int, timeout_s: float = LONG_TIMEOUT_S) -> bool:
    """True on every process when any process passed `flag`=True for this `round_index`.

    Every process must call it with the same `name` and `round_index` sequence. A process
    with the flag set writes the key `name/round_index` before the barrier; after it, every
    process reads the same answer. One barrier RPC (about a millisecond), no device work.
    Keys live as long as the job: use each (name, round_index) once.
    """
    if not _multi_process():
        return flag
    client, key = _client(), f"{KEY_PREFIX}/{name}/{round_index}"
    if flag:
        client.key_value_set(key, str(jax.process_index()), allow_overwrite=True)
    client.wait_at_barrier(f"{KEY_PREFIX}/{name}", int(timeout_s * 1000))
    return _try_get(f"{name}/{round_index}") is not None


def to_host(tree: Any) -> Any:
    """Numpy copies of the arrays of `tree`, whole, on every process.

    An array spread over processes (FSDP shards, or replicas on other hosts' devices) is
    first gathered to every device by a jitted identity (`process_allgather`): every process
    must call this, in the same order. One leaf at a time, so the device memory needed is
    one whole leaf.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def shared_workdir_check(path: str) -> None:
    """After the lead wrote `path`, a process that cannot see it runs on another filesystem."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"process {jax.process_index()} cannot see {path}, which process 0 wrote: the "
                                "workdir (and data.data_dir) must be on a filesystem every host shares")
