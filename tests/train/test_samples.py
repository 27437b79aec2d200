"""train/samples.py: the samples at the end of a run, and the one input it cannot sample from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.tokenizer.bpe import ByteLevelBPE
from models.gpt import GPT, llama_config
from models.random_params import random_params
from train.samples import prompt_ids, sample_continuations

# No special tokens: no BOS (as some loaded tokenizers have none) and no EOS.
TOKENIZER = ByteLevelBPE.train("the cat sat on the mat. " * 20, vocab_size=270, special_tokens=())


def _model():
    return GPT(llama_config(vocab_size=TOKENIZER.vocab_size, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                            max_len=16))


def test_an_empty_prompt_without_bos_is_a_clear_error():
    """Nothing to condition the first token on: the step would read logits at position -1."""
    assert TOKENIZER.bos_id is None
    model = _model()
    with pytest.raises(ValueError, match=r"prompt is empty and the tokenizer has no BOS token.*eval\.prompt"):
        prompt_ids(TOKENIZER, "")  # what a run can check before it trains
    with pytest.raises(ValueError, match=r"prompt is empty and the tokenizer has no BOS token.*eval\.prompt"):
        sample_continuations(model, None, TOKENIZER, "", num_samples=1, num_tokens=4, temperature=1.0,
                             max_len=16)


def test_greedy_samples_continue_the_prompt_with_the_argmax():
    """temperature 0: each new token is the argmax of a full forward over the text so far."""
    model = _model()
    params = random_params(model, 0, 2.0)
    prompt = "the cat"
    (text,) = sample_continuations(model, params, TOKENIZER, prompt, num_samples=1, num_tokens=5, temperature=0.0,
                                   max_len=16)
    ids = TOKENIZER.encode(prompt)
    for _ in range(5):
        logits = model.apply({"params": params}, jnp.asarray([ids], jnp.int32))
        ids.append(int(np.argmax(np.asarray(jax.device_get(logits))[0, -1])))
    assert TOKENIZER.eos_id is None
    assert text == prompt + TOKENIZER.decode(ids[len(TOKENIZER.encode(prompt)):])
