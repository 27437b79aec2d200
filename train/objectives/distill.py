"""Knowledge distillation (`objective=distill`): a student learns from a frozen teacher.

Axis letters: B batch, T length, V vocabulary, D concatenated head width.

    python -m train --config=configs/gpt.py:default --config.objective=distill \\
        --config.distill.teacher=/tmp/teacher --workdir=/tmp/student

The student is this run's model (any size: fewer layers, a smaller width, other head counts);
the teacher (`distill.teacher`: a `python -m train` workdir or a Hugging Face directory,
`train.teacher`) is loaded frozen onto the student's mesh under the run's strategy. Both must
read the same ids: a student without a tokenizer of its own (no `tokenizer.path` or
`init_from`) takes the teacher's (the lead writes it to WORKDIR/tokenizer); a given one must
equal it, and the teacher's vocabulary must be the student's (one error before any work).

`distill.mode`:
  * logits (decoders, and BERT's masked LM): per counted token (`loss_mask`: a decoder's real
    tokens, BERT's masked positions), the mix
        loss = alpha * T^2 * KL + (1 - alpha) * CE
    of the KL between the teacher's and the student's distributions at temperature T (forward
    KL(teacher || student) or reverse, `train.distill_losses.token_kl`) and the hard-label
    cross-entropy (with the run's z-loss and label smoothing), each summed over the tokens and
    divided by the whole batch's count (the accumulation contract of `train.objectives.base`).
  * minilm (BERT): the last layer's self-attention distributions and value relations
    (Wang et al. 2020) over R relation heads (`distill.relation_heads`, MiniLMv2's; 0: the
    student's head count), so the two models' head counts may differ:
        loss = alpha * (KL_attention + KL_value) + (1 - alpha) * CE(masked LM)
    each KL summed over real positions and divided by the batch's real positions.
  * sequence (decoders; Kim & Rush 2016): before training, the lead has the teacher continue
    `distill.num_prompts` training documents cut to their first `prompt_tokens` tokens, by
    `max_new_tokens` (greedy, or sampled at `sample_temperature`; `inference.generate`), and
    writes prompt + continuation as JSONL under data.data_dir (WORKDIR/tfds by default; named
    by a digest of its settings, `train.teacher_sequences`; written once, a resumed run reads it
    again); the student trains on them with the lm objective's
    cross-entropy (`SequenceDistillObjective`), packed as pretraining text is.

The teacher's outputs (logits [B, T, V] or the last layer's q, k, v [B, T, D]) come from
its own jitted forward on the placed batch (the `batches` hook), laid out like the batch, and
ride in it into the one sharded step: a teacher never enters the optimizer state or the
checkpoints. BERT's masked-LM corruption is drawn there too (from `fold_in(key(seed), step)`,
the validation batch i's from `key(i)` as the mlm objective's), so both models see the same
corrupted input; the step's own `prepare` is then the identity.

Metrics: `loss` (the mix), `ce` (the student's hard-label cross-entropy), `kl` (logits mode,
at T, not scaled) or `attention_kl` and `value_kl` (minilm), `accuracy`; the validation adds
`perplexity` = exp(ce) and is run before the first step as well (`eval_before`, the
student as it starts). The lm's report (bits per byte against xz, samples) or the mlm's
follows, on the student's cross-entropy.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from data import pipeline
from sharding import rules as rules_lib
from train import distill_losses, losses
from train import mlm as mlm_lib
from train import teacher_sequences as sequences_lib
from train.objectives import lm, register

MODES = ("logits", "sequence", "minilm")
QKV = ("query", "key", "value")
DISTILL_RNG_SALT = 0x444B44  # folded into key(seed) for a BERT batch's masks


@dataclasses.dataclass(frozen=True)
class DistillObjective:
    """Logit or MiniLM distillation of `student.model` (see the module docstring).

    Attributes:
      student: the student's own objective (lm for decoders, mlm for BERT): its model, loss
        settings, data, evaluation text and report.
      teacher: the teacher checkpoint (`train.init_from.Spec`).
      mode: logits | minilm.
      alpha: weight of the distillation term (1 - alpha: the cross-entropy).
      temperature: T (logits).
      direction: forward | reverse (logits).
      relation_heads: R (minilm).
      teacher_width: the teacher's concatenated q/k/v width (minilm's batch spec).
      seed: the run's seed (BERT's masks).
    """

    student: Any
    teacher: Any
    mode: str = "logits"
    alpha: float = 0.5
    temperature: float = 2.0
    direction: str = "forward"
    relation_heads: int = 0
    teacher_width: int = 0
    seed: int = 0
    name: str = "distill"
    # The teacher's model, weights and jitted forward, loaded on first use.
    cache: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def model(self):
        return self.student.model

    @property
    def mlm(self) -> mlm_lib.MLMConfig | None:
        return getattr(self.student, "mlm", None)

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A packed token batch and the teacher's float32 outputs (logits, or q/k/v)."""
        spec = lm.token_batch_spec(batch_size, seq_len)
        if self.mode == "minilm":
            spec.update({f"teacher_{k}": jax.ShapeDtypeStruct((batch_size, seq_len, self.teacher_width), jnp.float32)
                         for k in QKV})
        else:
            vocab = self.model.config.vocab_size
            spec["teacher_logits"] = jax.ShapeDtypeStruct((batch_size, seq_len, vocab), jnp.float32)
        return spec

    def prepare(self, batch, rng):
        return batch  # BERT's masks are drawn with the teacher's forward (module docstring)

    def totals(self, batch):
        totals = lm.token_totals(batch)
        if self.mode == "minilm":
            totals["num_positions"] = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)
        return totals

    # ------------------------------------------------------------------ the student's terms

    def _forward(self, params, batch, *, train: bool, rng=None):
        """(student logits [B, T, V], its last layer's q/k/v or None)."""
        kw = {"positions": batch["positions"], "segment_ids": batch["segment_ids"], "deterministic": not train}
        if train:
            kw["rngs"] = {"dropout": rng}
        if self.mode != "minilm":
            return self.model.apply({"params": params}, batch["inputs"], **kw), None
        logits, variables = self.model.apply({"params": params}, batch["inputs"], mutable=["attention_qkv"], **kw)
        return logits, last_layer_qkv(variables["attention_qkv"])

    def _distill_sums(self, logits, qkv, batch) -> dict[str, jax.Array]:
        """The distillation terms summed over the batch: logits' KL over counted tokens, or
        minilm's two relation KLs over real positions."""
        if self.mode == "minilm":
            teacher = {k: batch[f"teacher_{k}"] for k in QKV}
            kls = distill_losses.minilm_kl(qkv, teacher, batch["segment_ids"], self.relation_heads)
            return {k: jnp.sum(v) for k, v in kls.items()}
        kl_BT = distill_losses.token_kl(logits, batch["teacher_logits"], temperature=self.temperature,
                                        direction=self.direction)
        return {"kl": jnp.sum(kl_BT * (batch["loss_mask"] > 0))}

    def _mix(self, ce, distill: dict[str, jax.Array]):
        """alpha * distillation term + (1 - alpha) * ce, from the terms' means."""
        term = (distill["attention_kl"] + distill["value_kl"] if self.mode == "minilm" else
                self.temperature ** 2 * distill["kl"])
        return self.alpha * term + (1.0 - self.alpha) * ce

    def loss(self, params, batch, rng, totals):
        """(share of the whole batch's loss, (stats, None)) of a micro-batch."""
        s = self.student
        logits, qkv = self._forward(params, batch, train=True, rng=rng)
        _, aux = losses.cross_entropy(logits, batch["targets"], mask_BT=batch["loss_mask"],
                                      label_smoothing=s.label_smoothing, z_loss=s.z_loss)
        share = aux["num_tokens"] / totals["num_tokens"]
        count = totals["num_positions"] if self.mode == "minilm" else totals["num_tokens"]
        distill = {k: v / count for k, v in self._distill_sums(logits, qkv, batch).items()}
        hard = jnp.sum(aux["per_token"]) / totals["num_tokens"]  # cross-entropy + z-loss
        stats = {"ce": aux["cross_entropy"] * share, "z_loss": aux["z_loss"] * share,
                 "accuracy": aux["accuracy"] * share, **distill,
                 "num_tokens": jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32)}
        stats["loss"] = self._mix(hard, distill)
        return stats["loss"], (stats, None)

    def after_update(self, params, aux, accum_steps):
        return params, {}

    def eval_sums(self, params, batch, rng):
        """Summed student NLL (no z-loss), correct predictions, counted tokens and the
        distillation terms' sums (minilm: and the real positions)."""
        del rng
        logits, qkv = self._forward(params, batch, train=False)
        _, aux = losses.cross_entropy(logits, batch["targets"], mask_BT=batch["loss_mask"])
        num_tokens = aux["num_tokens"].astype(jnp.float32)
        sums = {"nll_sum": jnp.sum(aux["per_token"]), "num_tokens": num_tokens,
                "correct_sum": aux["accuracy"] * num_tokens,
                **{f"{k}_sum": v for k, v in self._distill_sums(logits, qkv, batch).items()}}
        if self.mode == "minilm":
            sums["num_positions"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """ce, perplexity, accuracy, the distillation terms and their mix `loss`."""
        tokens = max(sums["num_tokens"], 1.0)
        count = max(sums.get("num_positions", tokens), 1.0)
        distill = {k.removesuffix("_sum"): v / count for k, v in sums.items()
                   if k.endswith("_kl_sum") or k == "kl_sum"}
        ce = sums["nll_sum"] / tokens
        return {"loss": self._mix(ce, distill), "ce": ce, "perplexity": math.exp(min(ce, 30.0)),
                "accuracy": sums["correct_sum"] / tokens, **distill}

    # ------------------------------------------------------------------ host side: data, teacher

    def train_iterator(self, config, data_cfg: pipeline.DataConfig, tokenizer):
        return pipeline.train_iterator(data_cfg, tokenizer)

    def eval_batches(self, config, data_cfg: pipeline.DataConfig, tokenizer):
        return self.student.eval_batches(config, data_cfg, tokenizer)

    def report(self, run, params_fn, sums, metrics, eval_data) -> tuple[dict[str, Any], str]:
        """The student's own report (lm: bits per byte of its cross-entropy beside xz, samples)."""
        return self.student.report(run, params_fn, sums, metrics, eval_data)

    def _teacher(self, run):
        """(jitted f(teacher params, batch, rng) -> batch with the teacher's outputs, params)."""
        if "fn" not in self.cache:
            from train import teacher as teacher_lib

            model, _ = teacher_lib.checkpoint(self.teacher)
            params, shardings = teacher_lib.load_params(self.teacher, model, run.layout)
            layout = run.layout

            def attach(teacher_params, batch, rng):
                with layout.tracing():
                    return teacher_batch(model, teacher_params, batch, rng, mode=self.mode, mlm=self.mlm)

            self.cache["fn"] = jax.jit(attach, in_shardings=(shardings, layout.batch, layout.replicated),
                                       out_shardings=layout.batch)
            self.cache["params"] = params
        return self.cache["fn"], self.cache["params"]

    def _place(self, run, rows, rng) -> dict[str, jax.Array]:
        fn, params = self._teacher(run)
        return fn(params, rules_lib.device_put_batch(rows, run.batch_sharding), rng)

    def batches(self, run, train_iter, state_fn):
        """The training batches with the teacher's outputs (step i's masks: fold_in(key, i))."""
        step = int(state_fn().step)  # once: then counted here, so no step waits for the last
        key = jax.random.fold_in(jax.random.key(self.seed), DISTILL_RNG_SALT)
        for rows in train_iter:
            yield self._place(run, rows, jax.random.fold_in(key, step)), True
            step += 1

    def evaluate_run(self, run, state, eval_batches) -> tuple[dict[str, float], dict[str, float]]:
        """`eval_sums` over the validation batches (eval.max_batches of them), each with the
        teacher's outputs (batch i masked with key(i), as the mlm objective masks it)."""
        sums: dict[str, float] = {}
        for i, rows in enumerate(eval_batches):
            if run.config.eval.max_batches and i >= run.config.eval.max_batches:
                break
            batch = self._place(run, rows, jax.random.key(i))
            for key, value in run.eval_fn(state.params, state.frozen, batch, jax.random.key(i)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return sums, self.eval_metrics(sums)


def teacher_batch(model, params, batch: dict[str, jax.Array], rng: jax.Array, *, mode: str,
                  mlm: mlm_lib.MLMConfig | None = None) -> dict[str, jax.Array]:
    """`batch` (BERT's: masked-LM corrupted with `rng` first) with the teacher's float32 outputs:
    `teacher_logits` [B, T, V], or (minilm) `teacher_query`, `teacher_key`, `teacher_value` [B, T, D]."""
    if mlm is not None:
        batch = mlm_lib.mask_batch(rng, batch, mlm)
    kw = {"positions": batch["positions"], "segment_ids": batch["segment_ids"], "deterministic": True}
    if mode == "minilm":
        _, variables = model.apply({"params": params}, batch["inputs"], mutable=["attention_qkv"], **kw)
        qkv = last_layer_qkv(variables["attention_qkv"])
        return {**batch, **{f"teacher_{k}": v.astype(jnp.float32) for k, v in qkv.items()}}
    logits = model.apply({"params": params}, batch["inputs"], **kw)
    return {**batch, "teacher_logits": logits.astype(jnp.float32)}


def last_layer_qkv(collection: Mapping) -> dict[str, jax.Array]:
    """The q, k, v ([B, T, D], heads concatenated) the last layer (`layer_{L-1}`) sowed into
    the `attention_qkv` collection (`models.layers.multihead.MultiHeadAttention`)."""
    found: dict[int, tuple] = {}

    def visit(node, layer: int):
        for key, value in node.items():
            if key == "qkv":
                found[layer] = value[0]
            elif isinstance(value, Mapping):
                index = key.removeprefix("layer_")
                visit(value, int(index) if key.startswith("layer_") and index.isdigit() else layer)

    visit(collection, -1)
    if not found or max(found) < 0:
        raise ValueError("the model sowed no per-layer q/k/v (layer_{i}); MiniLM distillation needs unscanned "
                         "layers (model.scan_layers=false)")
    return {k: x.reshape(*x.shape[:2], -1) for k, x in zip(QKV, found[max(found)])}


# ------------------------------------------------------------------------------ sequence mode


@dataclasses.dataclass(frozen=True)
class SequenceDistillObjective(lm.LMObjective):
    """The lm objective's loss on the teacher's generations (sequence-level distillation);
    the evaluation stays on the run's own validation text."""

    name: str = "distill"
    sequences: str = ""  # their file under data_dir (`train.teacher_sequences.sequence_file`)

    def train_iterator(self, config, data_cfg: pipeline.DataConfig, tokenizer):
        return pipeline.train_iterator(sequences_lib.sequence_data_config(data_cfg, self.sequences), tokenizer)


# ------------------------------------------------------------------------------ config


def check_config(config, workdir: str) -> None:
    """The distill keys before any work (values, the teacher checkpoint, the mode against both
    models, the shared vocabulary and tokenizer, relation heads), then the text data.

    Raises:
      ValueError, FileNotFoundError: one line naming the config key and the fix.
    """
    from train import build, validate
    from train import teacher as teacher_lib
    from train.reward_model import tokenizer_difference

    d = config.distill
    if d.mode not in MODES:
        raise ValueError(f"config key `distill.mode`={d.mode!r}; expected one of {MODES}")
    if d.kl not in distill_losses.DIRECTIONS:
        raise ValueError(f"config key `distill.kl`={d.kl!r}; expected one of {distill_losses.DIRECTIONS}")
    for key, ok, want in (("alpha", 0.0 <= d.alpha <= 1.0, "in [0, 1]"), ("temperature", d.temperature > 0, "> 0"),
                          ("relation_heads", d.relation_heads >= 0, ">= 0 (0: the student's heads)"),
                          ("num_prompts", d.num_prompts >= 1, ">= 1"), ("prompt_tokens", d.prompt_tokens >= 1, ">= 1"),
                          ("max_new_tokens", d.max_new_tokens >= 1, ">= 1"),
                          ("sample_temperature", d.sample_temperature >= 0, ">= 0 (0: greedy)")):
        if not ok:
            raise ValueError(f"config key `distill.{key}`={d[key]} must be {want}")
    if config.sharding.strategy.startswith("pp"):
        raise ValueError(f"config key `sharding.strategy`={config.sharding.strategy!r} pipelines the student, but the "
                         "teacher's forward is not pipelined; use another strategy (dp, fsdp, tp, ...) for distill")
    spec = teacher_lib.parse(d.teacher)
    teacher_model, teacher_tokenizer = teacher_lib.checkpoint(spec)
    bert, teacher_bert = config.model.family == "bert", not hasattr(teacher_model.config, "mtp_depth")
    where = f"config key `distill.teacher`={d.teacher!r}"
    if teacher_tokenizer.eos_id is None:
        raise ValueError(f"{where} has a tokenizer without an end-of-text token, which the packed text the student "
                         "trains on separates documents with (data.pipeline); distil from a teacher whose tokenizer "
                         "has one (e.g. one trained by `python -m train`)")
    if bert != teacher_bert:
        raise ValueError(f"{where} is {'a BERT' if teacher_bert else 'a decoder'} but the student (model.family="
                         f"{config.model.family!r}) is not; distill a {'BERT' if teacher_bert else 'decoder'} student")
    if d.mode == "sequence" and bert:
        raise ValueError("config key `distill.mode`='sequence' distils a decoder's generations; a BERT student "
                         "takes mode logits or minilm")
    if d.mode == "minilm" and not bert:
        raise ValueError("config key `distill.mode`='minilm' transfers BERT's self-attention relations; a decoder "
                         "student takes mode logits or sequence")
    if d.mode == "logits" and not _has_lm_head(teacher_model):
        raise ValueError(f"{where} has no language-model head ({type(teacher_model).__name__}) to distil logits "
                         "from; give a causal or masked LM, or use distill.mode=minilm (BERT)")
    if d.mode != "sequence" and config.model.family != "bert" and (config.model.mtp_depth or
                                                                   config.model.moe.num_experts):
        raise ValueError("objective=distill (logits) trains a dense decoder without multi-token prediction; set "
                         "model.mtp_depth=0 and model.moe.num_experts=0 for the student")
    if d.mode != "sequence" and teacher_model.config.max_len < config.data.seq_len:
        raise ValueError(f"{where} has a context of {teacher_model.config.max_len} tokens < data.seq_len="
                         f"{config.data.seq_len}; lower data.seq_len")
    student_tokenizer = validate.existing_tokenizer(config, os.path.abspath(workdir)) if (
        config.tokenizer.path or config.init_from) else None
    if student_tokenizer is not None:
        reason = tokenizer_difference(teacher_tokenizer, student_tokenizer, "the teacher's")
        if reason:
            raise ValueError(f"{where}: the student's tokenizer differs from the teacher's ({reason}); distillation "
                             "needs one vocabulary: leave tokenizer.path empty to take the teacher's")
    vocab = (student_tokenizer or teacher_tokenizer).vocab_size
    student = build.model(config, vocab)
    if d.mode != "sequence" and student.config.vocab_size != teacher_model.config.vocab_size:
        raise ValueError(f"{where} has a vocabulary of {teacher_model.config.vocab_size} logits, the student "
                         f"{student.config.vocab_size} (model.vocab_size={config.model.vocab_size}); set "
                         f"model.vocab_size to {teacher_model.config.vocab_size} or 0")
    if d.mode == "minilm":
        heads = d.relation_heads or student.config.block.num_heads
        for who, w in (("teacher", teacher_lib.width(teacher_model)), ("student", teacher_lib.width(student))):
            if w % heads:
                raise ValueError(f"config key `distill.relation_heads`={heads}: the {who}'s q/k/v width {w} does not "
                                 "split into that many relation heads; pick a common divisor of both widths")
        if config.model.scan_layers:
            raise ValueError("config key `model.scan_layers`=true: MiniLM reads the last layer's q/k/v by name; "
                             "set it to false")
    validate.check_text_data(config, workdir)


def _has_lm_head(model) -> bool:
    from models.bert import BertForMaskedLM

    return isinstance(model, BertForMaskedLM) or getattr(model.config, "head", None) == "lm"


def prepare_data(config, workdir: str, data_cfg: pipeline.DataConfig):
    """The student's tokenizer: the teacher's, written to WORKDIR/tokenizer by the lead (unless
    tokenizer.path or init_from gives one); the data splits; in sequence mode the teacher's
    sequences (the lead writes them once; the others then check they see them). Runs under
    `train.distributed.lead_first`."""
    from train import build, distributed
    from train import teacher as teacher_lib

    own = config.tokenizer.path or config.init_from
    saved = os.path.join(workdir, "tokenizer")
    path = os.path.join(data_cfg.data_dir, sequences_lib.sequence_file(config))
    if distributed.is_lead():
        if not own and not os.path.isdir(saved):
            teacher_lib.checkpoint(teacher_lib.parse(config.distill.teacher))[1].save(saved)
        for split in dict.fromkeys((data_cfg.train_split, data_cfg.eval_split)):
            pipeline.open_split(data_cfg, split)
    else:
        if not own:
            distributed.shared_workdir_check(saved)
        if config.distill.mode == "sequence":
            distributed.shared_workdir_check(path)
    tokenizer = build.tokenizer(config, workdir, data_cfg)
    if config.distill.mode == "sequence" and distributed.is_lead() and not os.path.exists(path):
        from inference.load import load

        d, spec = config.distill, teacher_lib.parse(config.distill.teacher)
        loaded = load(spec.path, step=spec.step)
        prompts = sequences_lib.prompts_from(data_cfg, tokenizer, num_prompts=d.num_prompts, prompt_tokens=d.prompt_tokens,
                               seed=config.seed)
        count = sequences_lib.write_teacher_sequences(path, loaded, prompts, max_new_tokens=d.max_new_tokens,
                                        temperature=d.sample_temperature, seed=config.seed)
        print(f"distill: the teacher continued {count} training prompts into {path}", flush=True)
    return tokenizer


@register("distill", check=check_config, prepare=prepare_data)
def make(config, model, tokenizer):
    """The distill objective of a run config (`distill.*`; the student's own objective for its
    loss settings, data and report)."""
    from train import objectives
    from train import teacher as teacher_lib

    d = config.distill
    if d.mode not in MODES:
        raise ValueError(f"config key `distill.mode`={d.mode!r}; expected one of {MODES}")
    student = objectives.OBJECTIVES["mlm" if config.model.family == "bert" else "lm"](config, model, tokenizer)
    if d.mode == "sequence":
        return SequenceDistillObjective(**{f.name: getattr(student, f.name) for f in dataclasses.fields(student)
                                           if f.name != "name"}, sequences=sequences_lib.sequence_file(config))
    spec = teacher_lib.parse(d.teacher)
    teacher_model, _ = teacher_lib.checkpoint(spec)
    return DistillObjective(student, spec, mode=d.mode, alpha=d.alpha, temperature=d.temperature, direction=d.kl,
                            relation_heads=d.relation_heads or model.config.block.num_heads,
                            teacher_width=teacher_lib.width(teacher_model) if d.mode == "minilm" else 0,
                            seed=config.seed)
