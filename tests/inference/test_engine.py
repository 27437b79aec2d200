"""inference/engine.py and inference/paged.py: continuous batching gives each request what
`generate` gives it alone, slots are reused, the decode step compiles once, and a paged
cache gives the same outputs as a contiguous one in less memory.

Measured numbers (pool bytes against contiguous preallocation) are printed (run with `-s`).
"""

import dataclasses

import jax
import numpy as np
import pytest

from inference import generate, init_cache, kv_cache_bytes
from inference import paged as paged_lib
from inference.engine import Engine, Request, _decode_slots, _prefill_slot
from models.deepseek import deepseek_v3_config
from models.gpt import GPT, llama_config, scan_params
from models.random_params import random_params

CFG = llama_config(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_len=64)
SAMPLED = {"temperature": 0.8, "top_k": 10, "top_p": 0.9, "min_p": 0.05}
REQUESTS = [
    Request([3, 17, 8, 22], max_new_tokens=6),
    Request([5], max_new_tokens=9),
    Request([9, 30, 2, 11, 6, 14, 1], max_new_tokens=5),
    Request([7, 7, 1], max_new_tokens=8, seed=3, **SAMPLED),
    Request([2, 4, 6], max_new_tokens=8, seed=5, **SAMPLED),
    Request([12, 19, 33, 4, 8], max_new_tokens=10, repetition_penalty=1.3),
]
ARRIVALS = {0: [0, 1], 2: [2], 3: [3, 4], 9: [5]}  # step -> requests submitted before it


MODEL = GPT(CFG)
PARAMS = random_params(MODEL)


def serve(engine: Engine, requests=REQUESTS, arrivals=ARRIVALS) -> list[list[int]]:
    """Submits requests at their arrival steps, steps until all are done; outputs in request order."""
    ids, step = {}, 0
    while step <= max(arrivals) or engine.busy:
        for i in arrivals.get(step, []):
            ids[i] = engine.submit(requests[i])
        engine.step()
        step += 1
    return [engine.results[ids[i]] for i in range(len(requests))]


@pytest.fixture(scope="module")
def alone():
    """Each request as `generate` decodes it on its own. (Greedy prompts share one batched call,
    cut to each request's length: test_generate.py shows batching and N change no prefix.)"""
    greedy = generate(MODEL, PARAMS, [r.prompt for r in REQUESTS[:3]], max_new_tokens=9)
    out = [row[: r.max_new_tokens] for row, r in zip(greedy, REQUESTS)]
    for r in REQUESTS[3:]:
        out.append(generate(MODEL, PARAMS, [r.prompt], max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                            top_k=r.top_k, top_p=r.top_p, min_p=r.min_p, repetition_penalty=r.repetition_penalty,
                            seed=r.seed)[0])
    return out


def test_staggered_requests_equal_generate_alone_and_reuse_slots(alone):
    """Two slots, six requests arriving over time: greedy and sampled outputs equal `generate`."""
    engine = Engine(MODEL, PARAMS, num_slots=2, max_len=32)
    assert serve(engine) == alone
    uses = [u.slot for u in engine.history]
    assert len(uses) == len(REQUESTS) and max(uses.count(s) for s in (0, 1)) >= 3  # slots reused
    # A request that arrived while both slots were busy waited, then joined a freed slot.
    joined = {u.request_id: u.joined_step for u in engine.history}
    assert joined[2] > 2 and any(u.left_step == joined[2] for u in engine.history)


def test_stop_tokens_free_the_slot_early(alone):
    free = alone[0]
    engine = Engine(MODEL, PARAMS, num_slots=2, max_len=32)
    rid = engine.submit(dataclasses.replace(REQUESTS[0], stop_tokens=(free[2],)))
    events = []
    while engine.busy:
        events += engine.step()
    assert engine.results[rid] == free[: free.index(free[2]) + 1]
    assert [e[2] for e in events] == [False] * (len(events) - 1) + [True]


def test_decode_step_compiles_once():
    cfg = dataclasses.replace(CFG, max_len=48)  # a config no other test compiles
    model = GPT(cfg)
    before = _decode_slots._cache_size(), _prefill_slot._cache_size()
    serve(Engine(model, PARAMS, num_slots=2, max_len=48))
    # One decode program for every step; one prefill program per prompt bucket (all prompts here are <= 8).
    assert (_decode_slots._cache_size(), _prefill_slot._cache_size()) == (before[0] + 1, before[1] + 1)


def test_paged_engine_equals_generate_in_less_memory(alone):
    """4 slots of 64 positions in 8-position blocks: a pool of 16 blocks instead of 4 x 8 (+ 1)."""
    engine = Engine(MODEL, PARAMS, num_slots=4, max_len=64, block_size=8, num_blocks=16)
    assert serve(engine) == alone
    pool, full = engine.cache_bytes(), engine.contiguous_cache_bytes()
    peak = engine.allocator.peak_in_use
    print(f"\npaged pool {pool} bytes vs contiguous {full} bytes ({1 - pool / full:.0%} saved); "
          f"peak in use {peak} of {engine.allocator.usable} blocks = {peak * engine.block_bytes()} bytes")
    assert full == kv_cache_bytes(CFG, 4, 64) and pool == kv_cache_bytes(CFG, 1, 16 * 8) == full / 2
    assert engine.allocator.in_use == 0 and (engine.block_table == paged_lib.NULL_BLOCK).all()  # all returned


def test_paged_engine_waits_for_blocks(alone):
    """A pool of 4 usable blocks of 4: the second request (3 blocks) waits until the first (3) leaves."""
    engine = Engine(MODEL, PARAMS, num_slots=2, max_len=32, block_size=4, num_blocks=5)
    first, second = engine.submit(REQUESTS[2]), engine.submit(REQUESTS[0])
    engine.run()
    use = {u.request_id: u for u in engine.history}
    assert use[second].joined_step == use[first].left_step
    assert [engine.results[first], engine.results[second]] == [alone[2], alone[0]]
    with pytest.raises(ValueError, match="raise num_blocks"):
        engine.submit(Request([1] * 10, max_new_tokens=10))


@pytest.mark.parametrize("family", ["llama_scan_remat", "deepseek_v3_mla"])
def test_paged_cache_equals_contiguous_cache(family):
    """Prefill + decode through a block table with scattered, out-of-order blocks: the same logits
    as through a contiguous cache, for scanned layers and for MLA's latent cache."""
    if family == "deepseek_v3_mla":
        cfg = deepseek_v3_config(vocab_size=40, d_model=32, num_layers=2, num_heads=4, d_ff=40, moe_d_ff=12,
                                 num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                                 first_dense_layers=1, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
                                 qk_rope_head_dim=4, v_head_dim=8, max_len=32)
        params = random_params(GPT(cfg))
    else:
        cfg = dataclasses.replace(CFG, scan_layers=True, remat="full")
        params = scan_params(PARAMS, CFG)
    model, Z, S = GPT(cfg), 4, 16
    tables = np.array([[5, 2, 9, 1], [3, 8, 4, 6]], np.int32)  # rows' blocks, scattered in a pool of 10
    lengths = np.array([6, 3])
    ids = np.random.default_rng(0).integers(1, 40, (2, 6)).astype(np.int32)

    @jax.jit
    def run(cache, table):
        outs = []
        for positions in (np.broadcast_to(np.arange(6), (2, 6)), lengths[:, None], lengths[:, None] + 1):
            step_ids = ids if positions.shape[1] == 6 else (ids[:, :1] + positions) % 40
            c = cache if table is None else paged_lib.with_block_table(cache, table)
            logits, new = model.apply({"params": params, "cache": c}, step_ids, positions=positions,
                                      mutable=["cache"])
            cache = new["cache"] if table is None else paged_lib.without_block_table(new["cache"])
            outs.append(logits)
        return outs

    contiguous = run(init_cache(model, 2, S), None)
    paged = run(paged_lib.init_paged_cache(model, 10, Z), tables)
    for c, p in zip(contiguous, paged):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(c))


def test_bad_requests_are_named():
    engine = Engine(MODEL, PARAMS, num_slots=1, max_len=16)
    with pytest.raises(ValueError, match="max_len=16"):
        engine.submit(Request([1] * 10, max_new_tokens=7))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request([1], max_new_tokens=2, temperature=1.0, top_p=1.5))
    with pytest.raises(ValueError, match="multiple of block_size"):
        Engine(MODEL, PARAMS, max_len=20, block_size=8)
