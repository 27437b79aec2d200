"""train/reward_model.py across 2 processes x 2 CPU devices (gloo): a reward model read from an
hf: directory straight into an fsdp layout over the 4 devices (each process holds only its
devices' slices), each process scoring its own rows of a batch: the scores equal one process's
scores of the whole batch."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.tokenizer.training import train_tokenizer
from models import hf
from models.gpt import GPT, qwen2_config
from train.objectives.reward import sequence_scores

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 260
EPS32 = float(np.finfo(np.float32).eps)
ROWS_PER_PROCESS = 3  # padded by the scorer to the 2 batch shards each process holds
WORKER = textwrap.dedent("""
    import json, sys, types
    import jax
    pid, port, directory, data = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    import flax.linen as nn
    import numpy as np
    from sharding import mesh as mesh_lib
    from sharding.strategies import get_strategy
    from train.reward_model import RewardModel

    strategy = get_strategy("fsdp")
    mesh = mesh_lib.make_mesh("fsdp=4")
    rules = strategy.activation_rules(mesh)
    batch = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch",), rules))
    layout = types.SimpleNamespace(strategy=strategy, mesh=mesh, rules=rules, batch=batch)
    rm = RewardModel.load(f"hf:{directory}", layout=layout)
    kernel = rm.params["layer_0"]["mlp"]["wi_up"]
    held = sum(s.data.size for s in kernel.addressable_shards)
    rows = np.load(data)
    mine = slice(pid * ROWS, (pid + 1) * ROWS)
    scores = rm.score(rows["ids"][mine], rows["lens"][mine])
    print("SCORES", json.dumps({"scores": scores.tolist(), "held": held, "size": kernel.size}))
""").replace("ROWS", str(ROWS_PER_PROCESS))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm")
    config = qwen2_config(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=64)
    model = GPT(dataclasses.replace(config, head="score"))
    params = nn.unbox(model.init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree_util.tree_map(lambda x: x * 10.0 if x.ndim > 1 else x, params)
    hf.save_pretrained(model, params, str(directory), pad_token_id=0)
    train_tokenizer(["a reward model's own tokenizer"] * 4, VOCAB, ("<|endoftext|>",), trainer="lmlab",
                    directory=str(directory))
    return directory, model, params


def test_two_processes_score_their_own_rows_as_one_process_scores_all(reward_dir, tmp_path):
    directory, model, params = reward_dir
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 20, size=2 * ROWS_PER_PROCESS).astype(np.int32)
    ids = rng.integers(1, VOCAB, size=(2 * ROWS_PER_PROCESS, 20)).astype(np.int32)
    np.savez(tmp_path / "rows.npz", ids=ids, lens=lens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(port), str(directory),
                               str(tmp_path / "rows.npz")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.split("SCORES ", 1)[1]) for out, _ in outs]
    got = np.concatenate([r["scores"] for r in results])
    expected = np.asarray(sequence_scores(model, params, jnp.asarray(ids), jnp.asarray(lens)))
    tol = 16 * EPS32 * np.sqrt(64) * 3 * float(np.max(np.abs(expected)))
    print(f"\n2 processes vs 1: max |score diff| {np.max(np.abs(got - expected)):.2g} (tolerance {tol:.2g})")
    assert np.max(np.abs(got - expected)) <= tol
    # fsdp over 4 devices: each process holds its 2 devices' halves of a kernel, not the whole.
    assert all(r["held"] < r["size"] for r in results)
