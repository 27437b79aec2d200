"""The classification and qa objectives: losses equal transformers' on torch, the accumulation
contract (micro-batch shares add up to the whole batch's loss and gradient), padding rows count
for nothing, and the evaluation sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models.bert import BertForQuestionAnswering, BertForSequenceClassification
from models.convert.bert import config_from_hf, hf_to_params
from tests.minilm import minilm_path
from train.objectives.classification import ClassificationObjective
from train.objectives.qa import QAObjective

VOCAB, D, LAYERS, FF, B, T, LABELS = 50, 32, 2, 64, 6, 12, 3
EPS32 = float(np.finfo(np.float32).eps)


def _hf(head):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=FF, max_position_embeddings=T, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=LABELS if head == "classification"
                                     else 2, attn_implementation="eager")
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification if head == "classification" else \
        transformers.BertForQuestionAnswering
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("classifier", "qa_outputs")):
                p.copy_(torch.randn_like(p) / D**0.5)
    return model


def _setup(head):
    hf = _hf(head)
    config = config_from_hf(hf.config.to_dict())
    params = hf_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, config, head)
    if head == "classification":
        objective = ClassificationObjective(BertForSequenceClassification(config, num_labels=LABELS))
    else:
        objective = QAObjective(BertForQuestionAnswering(config))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 8:] = 0
    mask[4, 5:] = 0
    types = np.zeros((B, T), np.int64)
    types[:, 6:] = 1
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    if head == "classification":
        batch["labels"] = rng.integers(0, LABELS, size=B)
    else:
        batch["start_positions"] = rng.integers(0, 6, size=B)
        batch["end_positions"] = batch["start_positions"] + rng.integers(0, 4, size=B)
    return hf, objective, params, batch


def _jnp(batch):
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@pytest.mark.parametrize("head", ["classification", "qa"])
def test_loss_equals_transformers_hf_torch(head):
    hf, objective, params, batch = _setup(head)
    with torch.no_grad():
        reference = float(hf(**{k: torch.tensor(v) for k, v in batch.items()}).loss)
    jbatch = _jnp(batch)
    loss, (stats, _) = jax.jit(lambda p, b: objective.loss(p, b, jax.random.key(0), objective.totals(b)))(params, jbatch)
    # float32 logits through LAYERS post-LN layers, then a log-softmax over at most T entries.
    tol = 16 * EPS32 * np.sqrt(FF) * (LAYERS + 1) * max(abs(reference), 1.0)
    assert abs(float(loss) - reference) < tol
    assert float(stats["loss"]) == float(loss) and float(stats["examples"]) == B


@pytest.mark.parametrize("head", ["classification", "qa"])
def test_micro_batch_shares_add_up_and_padding_rows_count_for_nothing(head):
    _, objective, params, batch = _setup(head)
    jbatch = _jnp(batch)
    fast = {"xla_backend_optimization_level": 0}  # tiny model: compile time dominates
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, b, t: objective.loss(p, b, jax.random.key(0), t)[0]),
                             compiler_options=fast)
    totals = objective.totals(jbatch)
    whole_loss, whole_grad = value_and_grad(params, jbatch, totals)
    halves = [{k: v[i * B // 2:(i + 1) * B // 2] for k, v in jbatch.items()} for i in range(2)]
    parts = [value_and_grad(params, h, totals) for h in halves]
    np.testing.assert_allclose(float(parts[0][0] + parts[1][0]), float(whole_loss), rtol=8 * EPS32)
    summed = jax.tree_util.tree_map(lambda a, b: a + b, parts[0][1], parts[1][1])
    # Relative to the largest gradient: the key bias's is exactly zero (softmax is shift-invariant),
    # computed as rounding noise of the other terms.
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(whole_grad))
    for g, ref in zip(jax.tree_util.tree_leaves(summed), jax.tree_util.tree_leaves(whole_grad)):
        np.testing.assert_allclose(g, ref, rtol=0, atol=64 * EPS32 * scale)

    # Two padding rows (label / start -1, nothing attended) leave loss and eval sums unchanged.
    marker = "labels" if head == "classification" else "start_positions"
    padded = {k: np.concatenate([v, np.full((2, *v.shape[1:]), -1 if v.ndim == 1 else 0)]) for k, v in batch.items()}
    jpadded = _jnp(padded)
    assert float(objective.totals(jpadded)["examples"]) == B and (padded[marker][-2:] == -1).all()
    padded_loss, _ = value_and_grad(params, jpadded, objective.totals(jpadded))
    np.testing.assert_allclose(float(padded_loss), float(whole_loss), rtol=8 * EPS32)
    eval_sums = jax.jit(lambda p, b: objective.eval_sums(p, b, None), compiler_options=fast)
    sums, padded_sums = eval_sums(params, jbatch), eval_sums(params, jpadded)
    for key in sums:
        np.testing.assert_allclose(float(padded_sums[key]), float(sums[key]), rtol=8 * EPS32)


def test_classification_eval_metrics_equal_numpy():
    _, objective, params, batch = _setup("classification")
    logits = np.asarray(objective.model.apply({"params": params}, *(jnp.asarray(batch[k], jnp.int32) for k in (
        "input_ids", "attention_mask", "token_type_ids"))), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_loss = -logp[np.arange(B), batch["labels"]].mean()
    expected_accuracy = (logits.argmax(-1) == batch["labels"]).mean()
    sums = {k: float(v) for k, v in objective.eval_sums(params, _jnp(batch), None).items()}
    metrics = objective.eval_metrics(sums)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)


def test_task_config_reads_data_and_task_keys_and_squad_scores_equal_host_postprocessing(tmp_path):
    """The run config's data.* and task.* reach data.tasks; `squad_scores` (device n-best, host
    post-processing over the whole set) equals post-processing the full logits on the host."""
    import json

    from configs.base import get_config
    from data import squad
    from data.pipeline import DataConfig
    from data.tokenizer import load_tokenizer
    from evals.metrics.squad import squad as squad_exact_match_f1
    from models.bert import BertConfig
    from models.layers.blocks import BlockConfig
    from train.objectives.classification import task_config
    from train.objectives.qa import squad_predictions, squad_scores

    context = "Paris is the capital of France. Berlin is the capital of Germany. " * 3
    rows = [{"id": str(i), "question": f"Which city is a capital number {i}?", "context": context,
             "answers": {"text": [city], "answer_start": [context.index(city)]}}
            for i, city in enumerate(["Paris", "Berlin", "France", "Germany", "capital"])]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = get_config()
    config.task.update(doc_stride=8, max_query_len=16, n_best=5, max_answer_length=6)
    data_cfg = DataConfig(source=f"files:{tmp_path}/{{split}}.jsonl", seq_len=48, batch_size=4)
    task = task_config(config, data_cfg, "qa")
    assert (task.kind, task.seq_len, task.batch_size, task.doc_stride, task.max_query_len) == ("qa", 48, 4, 8, 16)

    tokenizer = load_tokenizer(minilm_path())
    model = BertForQuestionAnswering(BertConfig(vocab_size=tokenizer.vocab_size, max_len=48, num_layers=1, block=BlockConfig(
        d_model=32, num_heads=4, d_ff=64, mlp_activation="gelu", norm_position="post", norm_eps=1e-12)))
    params = model.init(jax.random.key(0), jnp.zeros((1, 48), jnp.int32))["params"]
    objective = QAObjective(model, n_best=5, max_answer_length=6)
    evaluation = objective.eval_batches(config, data_cfg, tokenizer)
    assert len(evaluation.features.input_ids) > len(rows)  # several windows per example
    start, end = model.apply({"params": params}, jnp.asarray(evaluation.arrays["input_ids"]),
                             jnp.asarray(evaluation.arrays["attention_mask"]),
                             jnp.asarray(evaluation.arrays["token_type_ids"]))
    expected = squad.postprocess(evaluation.examples, evaluation.features, *squad.top_k(np.asarray(start), 5),
                                 *squad.top_k(np.asarray(end), 5), max_answer_length=6)
    assert squad_predictions(objective, params, evaluation) == expected
    golds = [[r["answers"]["text"][0]] for r in rows]
    assert squad_scores(objective, params, evaluation) == squad_exact_match_f1(expected, golds)
