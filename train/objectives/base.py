"""What an objective is: the batch it needs, a pure loss, and its evaluation.

The loop, the sharded step (`train.step.train_step`, laid out by `sharding.step.build`),
checkpointing, accumulation and metrics are written once; an objective is the part that
differs between pretraining, masked LM, SFT, classification, QA (and later reward
modelling, DPO, distillation, PPO, GRPO). The trainer picks one by `config.objective`
(`train.objectives.get`).

Accumulation contract. The step calls, on the whole global batch, `prepare` (e.g. the
masked-LM corruption drawn from the step's rng) and `totals` (the normalizers of the whole
batch, e.g. its number of target tokens or examples; the step adds `micro_batches`, the
Python int A); then, for each of A micro-batches,
`loss(params, micro_batch, rng, totals)`. `loss` returns the micro-batch's share of the
whole batch's loss (sum over its units / totals), so the gradients summed over the
micro-batches are the gradient of one step on the whole batch; the `stats` it returns are
summed over the micro-batches too (give shares, like the loss). `aux` is summed as well and
handed to `after_update` (the LM's MoE router statistics and correction-bias update).

Evaluation: `eval_sums(params, batch, rng)` returns sums (device scalars) that the trainer
adds over the validation batches as floats; `eval_metrics(sums)` turns the totals into the
metrics written to the summary and eval.json.

Host side (not traced): `train_iterator(config, data_cfg, tokenizer)` gives this process's
rows of each global batch (a grain-style iterator with get_state/set_state, so a resumed run
continues where it stopped), `eval_batches(config, data_cfg, tokenizer)` the validation
batches (re-iterable: each evaluation reads them again), and optionally
`report(run, params_fn, sums, metrics, eval_data) -> (extra summary entries, one-line quality)`
adds what the objective measures beyond its metrics (the lm: bits per byte, xz, samples).

The step's metrics are the summed `stats`, the extra metrics of `after_update`, the gradient
norm and the learning rate.

Optional hooks, for objectives whose batches or evaluation need the model itself (a frozen
reference's log-probs, rollouts of the current policy):

  * `batches(run, train_iter, state_fn) -> iterator of (device batch, boundary)`: the device
    batches the loop steps on, instead of placing `next(train_iter)` as it is. `state_fn()`
    is the loop's current `TrainState` (its arrays laid out by `run.layout`; read it when the
    batch is made, never keep it: each step donates it). `boundary` is True when the batch is
    the last one made from what was drawn from `train_iter` so far (the last minibatch of a
    rollout): the loop saves checkpoints and stops on SIGTERM only at boundaries, so that
    `train_iter.get_state()` is the whole truth of the data position and a resumed run equals
    an uninterrupted one. Called once per run, after the state is initialized or restored.
  * `tokens_per_step(batch_size, seq_len) -> int`: the tokens one step computes, for tokens/s
    and MFU (default batch_size x seq_len; a preference pair is two rows, a rollout G per
    prompt). `token_nll = True` (a class attribute): the loss is a token cross-entropy, so the
    logged metrics add its perplexity.
  * `evaluate_run(run, state, eval_batches) -> (sums, metrics)`: the evaluation, instead of
    summing `eval_sums` over `eval_batches` (a generation scored by a verifier). An objective
    with it is also evaluated before a new run's first step: the summary holds `eval_before`
    and `eval_after` (its metrics).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax


class Objective(Protocol):
    """One way to train (see the module docstring for the accumulation contract)."""

    name: str

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch's keys, shapes and dtypes (every leaf's leading axis is the batch)."""

    def prepare(self, batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
        """The whole batch, transformed before it is split into micro-batches (default: as is)."""

    def totals(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Normalizers of the whole batch (float32 scalars), passed to every micro-batch's loss."""

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
             totals: dict[str, jax.Array]) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
        """(loss, (stats, aux)) of a micro-batch: its share of the whole batch's loss; pure."""

    def after_update(self, params: Any, aux: Any, accum_steps: int) -> tuple[Any, dict[str, jax.Array]]:
        """(params, extra metrics) after the optimizer update (default: unchanged, none)."""

    def eval_sums(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
        """Sums over one validation batch."""

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from the sums over every validation batch (must include `loss`)."""

    def train_iterator(self, config: Any, data_cfg: Any, tokenizer: Any) -> Any:
        """This process's rows of each training batch (dicts of numpy arrays), checkpointable."""

    def eval_batches(self, config: Any, data_cfg: Any, tokenizer: Any) -> Any:
        """The validation batches (re-iterable)."""
