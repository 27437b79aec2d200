"""The tiny encoder-decoder learns to reverse digit strings it has never seen."""

import numpy as np

from configs import transformer as transformer_configs
from train import seq2seq


def test_examples_are_reversals_and_held_out_strings_never_train():
    rng = np.random.default_rng(0)
    src, tgt_in, tgt_out = seq2seq.make_examples(rng, 300, 3, 8, held_out=False)
    for s, ti, to in zip(src, tgt_in, tgt_out):
        n = int(np.argmax(s == seq2seq.EOS))
        assert 3 <= n <= 8
        np.testing.assert_array_equal(to[:n], s[:n][::-1])
        assert to[n] == seq2seq.EOS and ti[0] == seq2seq.BOS
        np.testing.assert_array_equal(ti[1:], to[:-1])
    train_strings = {tuple(s) for s in src}
    held_src, _, _ = seq2seq.make_examples(rng, 300, 3, 8, held_out=True)
    assert not train_strings & {tuple(s) for s in held_src}


def test_tiny_transformer_learns_to_reverse():
    """>= 95% exact match on held-out strings (the task's learning check)."""
    config = transformer_configs.get_config("tiny")
    result = seq2seq.run(config, verbose=False)
    print(f"reversal: held-out exact match {result['held_out_exact_match']:.3f} after {result['steps']} steps, "
          f"final loss {result['final_loss']:.4f}, {result['seconds']:.0f}s")
    assert result["held_out_exact_match"] >= 0.95
