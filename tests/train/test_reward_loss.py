"""objective=reward's loss and metrics: equal to TRL's RewardTrainer.compute_loss run on
transformers' LlamaForSequenceClassification with the same weights and the same padded pairs
(margins included), and to a float64 hand computation; micro-batch shares add up to the whole
batch and padding pairs count for nothing."""

import collections
import dataclasses
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from trl import RewardTrainer

from configs.loader import load_config
from models import hf
from models.gpt import GPT, llama_config
from tests.cli_output import REPO
from train import build, trainable
from train.objectives.reward import RewardObjective, bradley_terry, pair_batch_spec

VOCAB, D, LAYERS, FF, PAD = 61, 32, 2, 48, 3
EPS32 = float(np.finfo(np.float32).eps)
B, T = 4, 10


def _model():
    config = llama_config(vocab_size=VOCAB, d_model=D, num_layers=LAYERS, num_heads=4, num_kv_heads=2, d_ff=FF,
                          max_len=32, norm_eps=1e-5)
    model = GPT(dataclasses.replace(config, head="score"))
    params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
    # Weights large enough that the scores spread over a few units (the loss's curved part).
    return model, jax.tree_util.tree_map(lambda x: x * 20.0 if x.ndim > 1 else x, params)


def _batch(seed: int = 0, padding_pairs: int = 0) -> dict[str, np.ndarray]:
    """B right-padded pairs of different lengths (0 for the last `padding_pairs`), real tokens != PAD."""
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        lens = rng.integers(2, T + 1, size=B)
        lens[B - padding_pairs:] = 0
        ids = rng.integers(4, VOCAB, size=(B, T))
        ids[np.arange(T)[None] >= lens[:, None]] = PAD
        batch[f"{side}_ids"], batch[f"{side}_len"] = ids.astype(np.int32), lens.astype(np.int32)
        batch[f"{side}_mask"] = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    batch["index"] = np.arange(B, dtype=np.int32)
    batch["margin"] = rng.uniform(-1.0, 1.0, B).astype(np.float32)
    spec = pair_batch_spec(B, T)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in spec.items()}
    return batch


def _trl_loss(reference, batch) -> tuple[float, dict]:
    """TRL's RewardTrainer.compute_loss (eval mode) on the transformers model: the chosen rows
    then the rejected rows, padded with the pad id, their attention masks and the margins."""
    ids = np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    inputs = {"input_ids": torch.from_numpy(ids).long(), "attention_mask": torch.from_numpy(mask).long(),
              "margin": torch.from_numpy(batch["margin"])}
    trainer = types.SimpleNamespace(
        model=reference, args=types.SimpleNamespace(center_rewards_coefficient=None), _tp_size=1,
        _total_train_tokens=0, _metrics={"eval": collections.defaultdict(list)},
        accelerator=types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x))
    with torch.no_grad():
        loss = RewardTrainer.compute_loss(trainer, reference, inputs)
        scores = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return float(loss), metrics | {"scores": scores.double().numpy()[:, 0]}


def test_loss_and_metrics_equal_trl_reward_trainer_hf_torch(tmp_path):
    model, params = _model()
    hf.save_pretrained(model, params, str(tmp_path), pad_token_id=PAD)
    reference = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = _batch()
    trl_loss, trl = _trl_loss(reference, batch)
    objective = RewardObjective(model)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, (stats, _) = jax.jit(objective.loss)(params, jb, jax.random.key(0), objective.totals(jb))
    # float64 by hand from transformers' scores.
    chosen, rejected = trl["scores"][:B], trl["scores"][B:]
    diff = chosen - rejected
    hand = float(np.mean(np.logaddexp(0.0, -(diff - batch["margin"]))))
    scale = float(np.max(np.abs(trl["scores"])))
    tol = 16 * EPS32 * np.sqrt(FF) * (LAYERS + 1) * scale  # the scores' float32 rounding; loss is 1-Lipschitz in them
    print(f"\nloss: ours {float(loss):.6f}, TRL {trl_loss:.6f}, float64 {hand:.6f}; tolerance {tol:.2g}; "
          f"accuracy {float(stats['accuracy'])}, margin {float(stats['margin']):.4f}")
    assert 0.1 < np.std(diff) and abs(float(loss) - trl_loss) <= tol and abs(float(loss) - hand) <= tol
    assert float(stats["accuracy"]) == trl["accuracy"] == np.mean(diff > 0)
    assert abs(float(stats["margin"]) - trl["margin"]) <= 2 * tol
    assert abs(float(stats["reward_chosen"]) - chosen.mean()) <= tol
    assert abs(float(stats["reward_rejected"]) - rejected.mean()) <= tol
    # eval_sums / eval_metrics give the same numbers.
    metrics = objective.eval_metrics({k: float(v) for k, v in objective.eval_sums(params, jb, None).items()})
    assert abs(metrics["loss"] - hand) <= tol and metrics["accuracy"] == np.mean(diff > 0)


def test_bradley_terry_is_stable_and_equals_float64():
    diff = np.array([-80.0, -3.0, -1e-3, 0.0, 2.5, 90.0])
    margin = np.array([0.5, -0.5, 0.0, 1.0, 0.0, 0.0])
    ours = np.asarray(bradley_terry(jnp.asarray(diff, jnp.float32), jnp.zeros(6), jnp.asarray(margin, jnp.float32)))
    expected = np.logaddexp(0.0, -(diff - margin))
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, expected, rtol=8 * EPS32, atol=8 * EPS32)


def test_micro_batch_shares_add_up_and_padding_pairs_count_for_nothing():
    model, params = _model()
    objective = RewardObjective(model)
    batch = {k: jnp.asarray(v) for k, v in _batch(seed=1, padding_pairs=1).items()}
    totals = objective.totals(batch)
    assert float(totals["pairs"]) == B - 1
    whole, (stats, _) = objective.loss(params, batch, jax.random.key(0), totals)
    halves = [objective.loss(params, {k: v[i:i + 2] for k, v in batch.items()}, jax.random.key(0), totals)
              for i in (0, 2)]
    tol = 8 * EPS32 * float(abs(whole))
    assert abs(float(whole) - sum(float(h[0]) for h in halves)) <= tol
    real = {k: v[:B - 1] for k, v in batch.items()}
    alone, _ = objective.loss(params, real, jax.random.key(0), objective.totals(real))
    assert abs(float(whole) - float(alone)) <= tol
    assert float(stats["pairs"]) == B - 1


def test_the_score_head_trains_under_lora():
    """Under a PEFT method the base is frozen but the fresh score head trains (objective_head)."""
    config = load_config(os.path.join(REPO, "configs/llama.py:tiny"), ["objective=reward", "finetune.method=lora"])
    model = build.model(config, VOCAB)
    assert model.config.head == "score"
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    trained, frozen = trainable.split(params, config, objective_head=RewardObjective(model).trainable_head)
    assert "score" in trained and "score" not in frozen and "embed" in frozen
