"""inference/generate.py: the two decode loops agree, batching does not change a prompt's
output, stop tokens end rows, and bad requests are named.

(transformers' greedy generate is the reference in test_generate_hf.py.)
"""

import pytest

from inference import generate
from models.gpt import GPT, llama_config
from models.random_params import random_params

CFG = llama_config(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_len=32)
PROMPTS = [[3, 17, 8, 22], [5], [9, 30, 2, 11, 6, 14, 1]]


MODEL = GPT(CFG)
PARAMS = random_params(MODEL)


def test_callback_streams_the_tokens_of_the_while_loop():
    """Sampled with every filter: the jitted-step loop and the while_loop draw the same tokens."""
    kw = {"max_new_tokens": 9, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "min_p": 0.02,
          "repetition_penalty": 1.2, "seed": 4}
    free = generate(MODEL, PARAMS, PROMPTS, **kw)
    stop = free[1][2]
    looped = generate(MODEL, PARAMS, PROMPTS, stop_tokens=(stop,), **kw)
    streamed = [[] for _ in PROMPTS]

    def callback(step, tokens):
        for row, token in zip(streamed, tokens):
            if token is not None:
                row.append(token)

    assert generate(MODEL, PARAMS, PROMPTS, stop_tokens=(stop,), callback=callback, **kw) == looped == streamed
    assert looped[1] == free[1][:3]  # row 1 stops at its third token, stop token included
    assert generate(MODEL, PARAMS, PROMPTS, **{**kw, "seed": 5}) != free


def test_batched_prompts_equal_each_prompt_alone():
    """Right padding and per-row positions: no row sees another's length or padding."""
    batched = generate(MODEL, PARAMS, PROMPTS, max_new_tokens=8)
    assert batched == [generate(MODEL, PARAMS, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert all(len(row) == 8 for row in batched)


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="max_len=32"):
        generate(MODEL, PARAMS, PROMPTS, max_new_tokens=30)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(MODEL, PARAMS, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        generate(MODEL, PARAMS, [[1, 40]], max_new_tokens=2)
