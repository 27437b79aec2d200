"""objective=dpo's losses and metrics against TRL's own implementations on the same inputs
(DPOTrainer._compute_loss for sigmoid and ipo, CPOTrainer.cpo_loss for conservative DPO and
SimPO, ORPOTrainer.odds_ratio_loss, KTOTrainer._compute_loss), with TRL's log-probs computed
by TRL from our model's logits; and every loss against its paper's formula in float64."""

import os
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.utils import selective_log_softmax

from models.gpt import GPT, GPTConfig
from models.layers.blocks import BlockConfig
from train import preference_losses as losses
from train.objectives.dpo import DPOObjective

EPS32 = float(np.finfo(np.float32).eps)
B, T, V = 6, 12, 37


@pytest.fixture(scope="module")
def policy():
    model = GPT(GPTConfig(vocab_size=V, num_layers=1, max_len=T, block=BlockConfig(d_model=16, num_heads=2, d_ff=32)))
    params = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    # Larger weights than the init's, so that log-probs (and accuracies) differ between rows.
    params = jax.tree_util.tree_map(lambda x: x * 4.0, params)
    return model, params


def _rows(seed: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Right-padded rows: a prompt of 2-4 tokens, a response of 1-7, padding 0."""
    rng = np.random.default_rng(seed)
    ids, mask, length = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32), np.zeros(B, np.int32)
    for b in range(B):
        prompt, response = rng.integers(2, 5), rng.integers(1, 8)
        length[b] = prompt + response
        ids[b, :length[b]] = rng.integers(1, V, length[b])
        mask[b, prompt:length[b]] = 1
    return {f"{prefix}ids": ids, f"{prefix}mask": mask, f"{prefix}len": length}


def _paired_batch(seed=0):
    chosen, rejected = _rows(seed), _rows(seed + 1)
    rng = np.random.default_rng(seed + 2)
    batch = {"chosen_ids": chosen["ids"], "chosen_mask": chosen["mask"], "chosen_len": chosen["len"],
             "rejected_ids": rejected["ids"], "rejected_mask": rejected["mask"], "rejected_len": rejected["len"],
             "index": np.arange(B, dtype=np.int32), "margin": np.zeros(B, np.float32),
             "ref_chosen_logps": rng.normal(-25, 6, B).astype(np.float32),
             "ref_rejected_logps": rng.normal(-25, 6, B).astype(np.float32)}
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _logits(policy, ids):
    model, params = policy
    return torch.tensor(np.asarray(model.apply({"params": params}, jnp.asarray(ids))))


def _trl_token_logps(logits, ids, mask):
    """TRL's per-token log-probs [rows, T - 1] of the masked tokens (0 elsewhere)."""
    ids, mask = torch.tensor(np.asarray(ids)).long(), torch.tensor(np.asarray(mask))
    return selective_log_softmax(logits[:, :-1], ids[:, 1:]) * mask[:, 1:]


class _Accelerator:
    device = "cpu"

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def _fake_model(outputs):
    """A model whose forward returns TRL's fused-head outputs for the ids it is given."""

    def forward(input_ids, **_):
        for ids, log_probs in outputs:
            if torch.equal(ids, input_ids):
                zeros = torch.zeros_like(log_probs)
                return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                       is_top1=zeros.bool(), aux_loss=None)
        raise AssertionError("unexpected input_ids")

    return forward


def _trainer_namespace(**settings):
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(), precompute_ref_logps=True,
                           ld_alpha=None, aux_loss_enabled=False, f_divergence_type="reverse_kl", use_weighting=False,
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
                           args=SimpleNamespace(), **settings)


def _ours(objective, params, batch):
    totals = {**objective.totals(batch), "micro_batches": 1}
    loss, (stats, _) = objective.loss(params, batch, jax.random.key(0), totals)
    return float(loss), {k: float(v) for k, v in stats.items()}


def _tolerance(token_logps) -> float:
    """A sequence log-prob sums up to T float32 terms in another order: about T eps32 max|logp|."""
    return 4 * EPS32 * T * float(np.abs(np.asarray(token_logps)).max()) + 1e-7


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl_dpo_trainer(policy, loss_type):
    model, params = policy
    batch, beta = _paired_batch(), 0.3
    ids = torch.tensor(np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])).long()
    mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    lengths = np.concatenate([batch["chosen_len"], batch["rejected_len"]])
    log_probs = _trl_token_logps(_logits(policy, ids.numpy()), ids, mask)
    inputs = {"input_ids": ids, "attention_mask": torch.tensor(np.arange(T)[None] < lengths[:, None]).long(),
              "completion_mask": torch.tensor(mask).long(),
              "ref_chosen_logps": torch.tensor(np.asarray(batch["ref_chosen_logps"])),
              "ref_rejected_logps": torch.tensor(np.asarray(batch["ref_rejected_logps"]))}
    ns = _trainer_namespace(loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0)
    want = float(DPOTrainer._compute_loss(ns, _fake_model([(ids, log_probs)]), inputs, False))
    trl_metrics = {k: v[-1] for k, v in ns._metrics["train"].items()}
    loss, stats = _ours(DPOObjective(model, loss_type=loss_type, beta=beta), params, batch)
    tol = _tolerance(log_probs)
    scale = 2 * abs(want) / beta if loss_type == "ipo" else beta  # d loss / d logp
    np.testing.assert_allclose(loss, want, rtol=0, atol=tol * scale)
    for ours, theirs in [("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("rewards_margins", "rewards/margins"), ("logps_chosen", "logps/chosen"),
                         ("logps_rejected", "logps/rejected")]:
        np.testing.assert_allclose(stats[ours], trl_metrics[theirs], rtol=0, atol=tol, err_msg=ours)
    assert stats["rewards_accuracies"] == pytest.approx(trl_metrics["rewards/accuracies"])
    assert 0 < stats["rewards_accuracies"] < 1  # a batch with both outcomes


def _average_logps(policy, ids, mask):
    """TRL's CPO/ORPO `get_batch_logps(average_log_prob=True)` on our model's logits."""
    labels = torch.tensor(np.where(np.asarray(mask) > 0, np.asarray(ids), -100)).long()
    return CPOTrainer.get_batch_logps(_logits(policy, ids), labels, average_log_prob=True)


@pytest.mark.parametrize(("loss_type", "label_smoothing"), [("simpo", 0.0), ("simpo", 0.2)])
def test_simpo_equals_trl_cpo_trainer(policy, loss_type, label_smoothing):
    model, params = policy
    batch, beta, gamma = _paired_batch(1), 2.0, 0.7
    chosen = _average_logps(policy, batch["chosen_ids"], batch["chosen_mask"])
    rejected = _average_logps(policy, batch["rejected_ids"], batch["rejected_mask"])
    ns = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                         label_smoothing=label_smoothing, accelerator=_Accelerator())
    per_row, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(ns, chosen, rejected)
    batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    loss, stats = _ours(DPOObjective(model, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                                     label_smoothing=label_smoothing), params, batch)
    tol = 8 * EPS32 * float(chosen.abs().max())
    np.testing.assert_allclose(loss, float(per_row.mean()), rtol=0, atol=2 * beta * tol)
    np.testing.assert_allclose(stats["rewards_chosen"], float(chosen_rewards.mean()), rtol=0, atol=beta * tol)
    np.testing.assert_allclose(stats["rewards_margins"], float((chosen_rewards - rejected_rewards).mean()), rtol=0,
                               atol=2 * beta * tol)
    np.testing.assert_allclose(stats["logps_rejected"], float(rejected.mean()), rtol=0, atol=tol)


def test_conservative_dpo_equals_trl_cpo_smoothed_sigmoid(policy):
    """cDPO's loss is TRL's CPO sigmoid loss (Eq. 3 with label smoothing) applied to the log-ratios."""
    model, params = policy
    batch, beta, eps = _paired_batch(2), 0.5, 0.15
    token = lambda ids, mask: _trl_token_logps(_logits(policy, ids), ids, mask).sum(-1)
    chosen = token(batch["chosen_ids"], batch["chosen_mask"]) - torch.tensor(np.asarray(batch["ref_chosen_logps"]))
    rejected = token(batch["rejected_ids"], batch["rejected_mask"]) - torch.tensor(
        np.asarray(batch["ref_rejected_logps"]))
    ns = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps, accelerator=_Accelerator())
    per_row, _, _ = CPOTrainer.cpo_loss(ns, chosen, rejected)
    loss, _ = _ours(DPOObjective(model, loss_type="sigmoid", beta=beta, label_smoothing=eps), params, batch)
    np.testing.assert_allclose(loss, float(per_row.mean()), rtol=0, atol=2 * beta * _tolerance(chosen))


def test_orpo_equals_trl_odds_ratio_and_the_response_nll(policy):
    """TRL's odds-ratio term on the same per-token means; the NLL is the paper's (the chosen
    response's tokens; TRL's ORPO also counts the prompt's), by hand in float64."""
    model, params = policy
    batch, beta = _paired_batch(3), 0.25
    chosen = _average_logps(policy, batch["chosen_ids"], batch["chosen_mask"])
    rejected = _average_logps(policy, batch["rejected_ids"], batch["rejected_mask"])
    per_row, _, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=beta, accelerator=_Accelerator()),
                                                                  chosen, rejected)
    logits = _logits(policy, batch["chosen_ids"]).double()
    ids = torch.tensor(np.asarray(batch["chosen_ids"])).long()
    mask = torch.tensor(np.asarray(batch["chosen_mask"]))[:, 1:].double()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    nll = float(-(token * mask).sum() / mask.sum())
    batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    loss, stats = _ours(DPOObjective(model, loss_type="orpo", beta=beta), params, batch)
    tol = 8 * EPS32 * float(token.abs().max())
    np.testing.assert_allclose(stats["nll_loss"], nll, rtol=0, atol=tol)
    np.testing.assert_allclose(loss, nll - float(per_row.mean()), rtol=0, atol=2 * tol)
    np.testing.assert_allclose(stats["log_odds_ratio"], float(ratio), rtol=0, atol=4 * tol)
    np.testing.assert_allclose(stats["log_odds_chosen"], float(log_odds), rtol=0, atol=4 * tol)


def test_kto_equals_trl_kto_trainer(policy):
    model, params = policy
    rows, kl_rows = _rows(4), _rows(5)
    rng = np.random.default_rng(6)
    label = np.array([1, 0, 1, 1, 0, 0], np.int32)
    batch = {"ids": rows["ids"], "mask": rows["mask"], "len": rows["len"], "label": label,
             "index": np.arange(B, dtype=np.int32), "kl_ids": kl_rows["ids"], "kl_mask": kl_rows["mask"],
             "kl_len": kl_rows["len"], "ref_logps": rng.normal(-25, 6, B).astype(np.float32),
             "ref_kl_logps": rng.normal(-32, 6, B).astype(np.float32)}
    beta, wd, wu = 0.4, 1.0, 1.3
    ids, kl_ids = torch.tensor(rows["ids"]).long(), torch.tensor(kl_rows["ids"]).long()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(rows["mask"]),
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": torch.tensor(kl_rows["mask"]), "label": torch.tensor(label).bool(),
              "ref_logps": torch.tensor(batch["ref_logps"]), "ref_KL_logps": torch.tensor(batch["ref_kl_logps"])}
    outputs = [(ids, _trl_token_logps(_logits(policy, rows["ids"]), rows["ids"], rows["mask"])),
               (kl_ids, _trl_token_logps(_logits(policy, kl_rows["ids"]), kl_rows["ids"], kl_rows["mask"]))]
    ns = _trainer_namespace(calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=wd,
                            undesirable_weight=wu)
    ns._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(ns, model, batch)
    want = float(KTOTrainer._compute_loss(ns, _fake_model(outputs), inputs, False))
    trl_metrics = {k: v[-1] for k, v in ns._metrics["train"].items()}
    loss, stats = _ours(DPOObjective(model, loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu),
                        params, {k: jnp.asarray(v) for k, v in batch.items()})
    tol = _tolerance(outputs[0][1])
    assert trl_metrics["kl"] > 0  # the clamp at 0 is not what is compared
    np.testing.assert_allclose(loss, want, rtol=0, atol=2 * beta * max(wd, wu) * tol)
    for ours, theirs in [("kl", "kl"), ("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("rewards_margins", "rewards/margins"), ("logps_chosen", "logps/chosen"),
                         ("logps_rejected", "logps/rejected")]:
        np.testing.assert_allclose(stats[ours], trl_metrics[theirs], rtol=0, atol=2 * tol, err_msg=ours)


def test_losses_equal_the_papers_formulas_in_float64():
    rng = np.random.default_rng(7)
    pc, pr, rc, rr = (rng.normal(-20, 5, 64) for _ in range(4))
    nc, nr = rng.integers(1, 30, 64).astype(np.float64), rng.integers(1, 30, 64).astype(np.float64)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    logsig = lambda x: -np.logaddexp(0.0, -x)
    beta, eps, gamma = 0.2, 0.1, 0.5
    d = beta * ((pc - rc) - (pr - rr))
    cases = {
        "cdpo": (losses.dpo_sigmoid(f32(pc - rc), f32(pr - rr), beta=beta, label_smoothing=eps),
                 -(1 - eps) * logsig(d) - eps * logsig(-d)),
        "ipo": (losses.ipo(f32(pc - rc), f32(pr - rr), f32(nc), f32(nr), beta=beta),
                ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2),
        "simpo": (losses.simpo(f32(pc / nc), f32(pr / nr), beta=beta, gamma=gamma),
                  -logsig(beta * (pc / nc - pr / nr) - gamma)),
    }
    mc, mr = -rng.uniform(0.01, 6, 64), -rng.uniform(0.01, 6, 64)  # per-token means, both sides of -log 2
    odds = lambda m: np.exp(m) / (1 - np.exp(m))
    cases["orpo_log_odds"] = (losses.orpo_log_odds(f32(mc), f32(mr)), np.log(odds(mc) / odds(mr)))
    label, z = rng.integers(0, 2, 64), 1.3
    sig = lambda x: 1 / (1 + np.exp(-x))
    cases["kto"] = (losses.kto(f32(pc - rc), jnp.asarray(label), f32(z), beta=beta, desirable_weight=1.5,
                               undesirable_weight=0.5),
                    np.where(label == 1, 1.5 * (1 - sig(beta * ((pc - rc) - z))), 0.5 * (1 - sig(beta * (z - (pc - rc))))))
    for name, (got, want) in cases.items():
        # float32 inputs of magnitude ~40 carry ~40 eps32 of error; each loss is smooth in them.
        scale = 1 + np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=64 * EPS32 * 40 * scale, err_msg=name)
    valid = jnp.asarray(rng.integers(0, 2, 64))
    kl = rng.normal(0.5, 1, 64)
    want_kl = max((kl * np.asarray(valid)).sum() / np.asarray(valid).sum(), 0.0)
    np.testing.assert_allclose(float(losses.kl_estimate(f32(kl), valid)), want_kl, rtol=1e-6)
    assert float(losses.kl_estimate(f32(kl - 5.0), valid)) == 0.0
