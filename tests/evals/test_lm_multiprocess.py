"""evals/lm.py across 2 processes x 4 CPU devices (gloo): ModelLM.from_path under fsdp over the 8
devices of both processes (each process holds only its devices' slices of the params), every
process running the same requests (SPMD): each process reads the results one process with 8
devices computes."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from evals.lm import ModelLM
from tests.evals.test_lm import (
    CHUNK,
    CONTEXTS,
    EPS32,
    LL_REQUESTS,
    MAX_LENGTH,
    ROLLING,
    N,
    _hf_model,
    _save_tokenizer,
    _trained_bpe,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = textwrap.dedent("""
    import json, sys
    import jax
    pid, port, directory, requests = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    from evals.lm import ModelLM

    with open(requests) as f:
        r = json.load(f)
    lm = ModelLM.from_path(directory, batch_size=3, max_length=r["max_length"], strategy="fsdp")
    lm.decode_chunk = r["chunk"]
    kernel = lm.params["layer_0"]["mlp"]["wi_up"]
    out = {"ll": lm.loglikelihood([tuple(x) for x in r["ll"]]), "rolling": lm.loglikelihood_rolling(r["rolling"]),
           "gen": lm.generate_until([tuple(x) for x in r["gen"]]),
           "held": sum(s.data.size for s in kernel.addressable_shards), "size": kernel.size}
    print("RESULT", json.dumps(out))
""")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    _hf_model("llama").save_pretrained(directory, safe_serialization=True)
    _save_tokenizer(directory, _trained_bpe(), bos_template=True)
    return directory


def test_two_processes_read_what_one_process_computes(llama_dir, tmp_path):
    generation = [(c, {"until": ["."], "max_gen_toks": N}) for c in CONTEXTS]
    (tmp_path / "requests.json").write_text(json.dumps(
        {"ll": LL_REQUESTS, "rolling": ROLLING, "gen": generation, "max_length": MAX_LENGTH, "chunk": CHUNK}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(port), str(llama_dir),
                               str(tmp_path / "requests.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
               for out, _ in outputs]

    one = ModelLM.from_path(str(llama_dir), batch_size=3, max_length=MAX_LENGTH)  # 8 devices, one process
    one.decode_chunk = CHUNK
    ll, rolling, texts = one.loglikelihood(LL_REQUESTS), one.loglikelihood_rolling(ROLLING), one.generate_until(
        generation)
    expected = np.array([v for v, _ in ll] + rolling)
    for r in results:
        assert r["held"] * 2 == r["size"]  # fsdp over both processes: each holds half of every split leaf
        assert [g for _, g in r["ll"]] == [g for _, g in ll] and r["gen"] == texts
        got = np.array([v for v, _ in r["ll"]] + r["rolling"])
        # The same rows, compiled for another layout: a few roundings of each value.
        assert np.all(np.abs(got - expected) <= 16 * EPS32 * np.maximum(np.abs(expected), 1.0))
