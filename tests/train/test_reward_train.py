"""objective=reward end to end: a tiny decoder trained by `train.trainer.run` (fsdp on 8
devices) on a preference JSONL the test writes, where the chosen response holds a marker word,
reaches >= 90% held-out pair accuracy; one sharded step equals the unsharded one; the run
exports as a LlamaForSequenceClassification whose transformers scores equal ours on the
held-out rows; the scorer (`train.reward_model.RewardModel`) from the run and from the export
equals the model's own scores, laid out on the mesh without a gather; bad input is one line."""

import dataclasses
import json
import os
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs.loader import load_config
from data import preference
from data.tokenizer import load_tokenizer
from data.tokenizer.training import train_tokenizer
from inference import load
from models.gpt import GPT, llama_config
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from tests.cli_output import REPO
from train import build, evaluate, export, init_from, trainer
from train import program as program_lib
from train.objectives.reward import pair_scores, sequence_scores
from train.reward_model import RewardModel

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
         "checkpoint.async_save=false"]
WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "sugar", "north", "glass"]
MARKER = "great"
EPS32 = float(np.finfo(np.float32).eps)


def _pairs(count: int = 240) -> list[dict]:
    """Pairs whose chosen response holds MARKER somewhere and whose rejected one does not."""
    rng = random.Random(0)
    out = []
    for _ in range(count):
        words = rng.sample(WORDS, 4)
        chosen = list(words[:3])
        chosen.insert(rng.randrange(4), MARKER)
        rejected = rng.sample(WORDS, 4)
        out.append({"prompt": f"Review of {words[3]}:", "chosen": " " + " ".join(chosen),
                    "rejected": " " + " ".join(rejected), "gap": 0.5})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_data")
    lines = _pairs()
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    texts = [line["prompt"] + line["chosen"] + line["rejected"] for line in lines]
    train_tokenizer(texts, 300, ("<|endoftext|>",), trainer="lmlab", directory=str(root / "tokenizer"))
    return path, root / "tokenizer"


def _config(files, *overrides):
    path, tokenizer = files
    return load_config(os.path.join(REPO, "configs/llama.py:tiny"), [
        "objective=reward", f"data.source=files:{path}", f"tokenizer.path={tokenizer}", "data.seq_len=32",
        "data.batch_size=16", "data.validation_fraction=0.2", "model.max_len=32", "eval.max_batches=0",
        "preference.margin_key=gap", *QUIET, *overrides])


@pytest.fixture(scope="module")
def reward_run(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward_run")
    config = _config(files, "steps=40", "schedule.warmup_steps=5", "optimizer.lr=3e-3",
                     "checkpoint.save_interval_steps=40", "sharding.strategy=fsdp", "sharding.mesh=fsdp=8")
    summary = trainer.run(config, str(workdir))
    return workdir, summary


def test_reward_run_learns_the_marker_on_held_out_pairs(reward_run):
    _, summary = reward_run
    print(f"\nheld-out: accuracy {summary['val_accuracy']:.3f}, loss {summary['val_loss']:.3f}, margin "
          f"{summary['val_margin']:.2f} (chosen {summary['val_reward_chosen']:.2f}, rejected "
          f"{summary['val_reward_rejected']:.2f}); train loss {summary['train_loss']:.3f}")
    assert summary["val_accuracy"] >= 0.9
    assert summary["val_loss"] < np.log(2) and summary["val_margin"] > 0
    assert summary["val_reward_chosen"] - summary["val_reward_rejected"] == pytest.approx(summary["val_margin"],
                                                                                          abs=1e-4)
    # python -m train.evaluate reproduces the run's final metrics; python -m inference refuses it.
    workdir, _ = reward_run
    metrics = evaluate.evaluate_checkpoint(str(workdir))["metrics"]
    for key in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected"):
        assert metrics[key] == pytest.approx(summary[f"val_{key}"], rel=1e-5, abs=1e-6), key
    with pytest.raises(TypeError, match="holds a reward model"):
        load.load(str(workdir))


def _step_once(config, strategy: str, mesh, start, batch):
    """Two optimizer steps of the reward objective from `start` under `strategy` on `mesh`."""
    tokenizer = load_tokenizer(config.tokenizer.path)
    model = build.model(config, tokenizer.vocab_size)
    tx, schedule = build.optimizer(config)
    program = program_lib.build_for_run(config, model, tx, schedule, strategy=get_strategy(strategy), mesh=mesh)
    state = program.init(jax.random.key(0)) if start is None else jax.device_put(start, program.layout.state)
    placed = {k: jax.device_put(v, program.layout.batch) for k, v in batch.items()}
    for _ in range(2):
        state, metrics = program.step(state, placed, jax.random.key(1))
    return jax.device_get(program.init(jax.random.key(0))) if start is None else None, jax.device_get(state), \
        jax.device_get(metrics)


def test_fsdp_on_8_devices_equals_one_device(files):
    # Adam's eps raised so that its update is bounded by lr * |dg| / eps for a gradient element
    # near 0 (else any rounding difference flips such an element's update by lr).
    config = _config(files, "steps=10", "schedule.warmup_steps=1", "optimizer.eps=1e-5")
    tokenizer = load_tokenizer(config.tokenizer.path)
    data_cfg = build.data_config(config, "/tmp/unused")
    batch = next(preference.train_iterator(data_cfg, preference.preference_config(config), tokenizer))
    one = mesh_lib.make_mesh("data=1", devices=jax.devices()[:1])
    start, single, single_metrics = _step_once(config, "dp", one, None, batch)
    _, sharded, sharded_metrics = _step_once(config, "fsdp", mesh_lib.make_mesh("fsdp=8"), start, batch)
    # A gradient element sums over the N = 2 B T tokens in another order under another layout:
    # it moves by about 4 EPS32 sqrt(N) times the rms element |g| / sqrt(P); Adam moves a
    # parameter by at most lr * dg / eps for it, over the 2 steps.
    tokens = 2 * config.data.batch_size * config.data.seq_len
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(single.params))
    dg = 4 * EPS32 * np.sqrt(tokens) * float(single_metrics["grad_norm"]) / np.sqrt(num_params)
    atol = 2 * config.optimizer.lr * dg / config.optimizer.eps
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(sharded.params), jax.tree_util.tree_leaves(
            single.params)):
        np.testing.assert_allclose(x, y, rtol=2 * EPS32, atol=atol, err_msg=jax.tree_util.keystr(path))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(single.params),
                                                             jax.tree_util.tree_leaves(start.params)))
    print(f"\nfsdp=8 vs 1 device after 2 steps: params within {atol:.2g} (they moved by up to {moved:.2g})")
    assert moved > 10 * atol
    for key in ("loss", "margin", "grad_norm"):
        np.testing.assert_allclose(sharded_metrics[key], single_metrics[key], rtol=4 * EPS32 * np.sqrt(tokens),
                                   atol=4 * EPS32 * np.sqrt(tokens), err_msg=key)
    assert sharded_metrics["accuracy"] == single_metrics["accuracy"]


def _held_out(config, tokenizer) -> dict:
    data_cfg = build.data_config(config, "/tmp/unused")
    _, validation = preference.splits(data_cfg, preference.preference_config(config), tokenizer)
    return validation


def test_export_scores_equal_transformers_and_the_scorer_equals_the_model(reward_run, files, tmp_path):
    workdir, summary = reward_run
    result = export.export(str(workdir), str(tmp_path / "hf"))
    assert result["architecture"] == "LlamaForSequenceClassification"
    config = init_from.run_config(init_from.parse(f"run:{workdir}"))
    tokenizer = load_tokenizer(config.tokenizer.path)
    rows = _held_out(config, tokenizer)
    ids, lens = rows["chosen_ids"], rows["chosen_len"]
    # transformers on the held-out chosen rows as the data pads them (with 0 = pad_token_id).
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf",
                                                                                 dtype=torch.float32).eval()
    assert reference.config.pad_token_id == 0 and reference.config.num_labels == 1
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids).long(),
                           attention_mask=torch.from_numpy((ids != 0).astype(np.int64))).logits.numpy()[:, 0]
    # Ours: the run's own params, whole, on one device.
    from inference.load import run_params

    model = build.model(config, tokenizer.vocab_size)
    params = run_params(str(workdir), 40, config, model)
    ours = np.asarray(sequence_scores(model, params, jnp.asarray(ids), jnp.asarray(lens)))
    tol = 16 * EPS32 * np.sqrt(config.model.block.d_ff) * (config.model.num_layers + 1) * np.max(np.abs(theirs))
    assert np.max(np.abs(ours - theirs)) <= tol
    # The scorer: from the run (fsdp=8 layout, tokenizer checked) and from the export.
    run = trainer.setup(_config(files, "sharding.strategy=fsdp", "sharding.mesh=fsdp=8"), str(tmp_path / "policy"))
    scorer = RewardModel.load(f"run:{workdir}", layout=run.layout, tokenizer=run.tokenizer)
    embed = scorer.params["embed"]["embedding"]
    # Laid out as the run lays out its own parameters: split over the 8 devices, never gathered.
    assert embed.sharding == run.layout.state.params["embed"]["embedding"]
    assert embed.sharding.shard_shape(embed.shape) != embed.shape
    for rm in (scorer, RewardModel.load(f"hf:{tmp_path / 'hf'}")):
        got = rm.score(ids, lens)
        assert np.max(np.abs(got - ours)) <= tol
    # score_texts renders as the reward data: the held-out pairs' accuracy is the run's.
    lines = [json.loads(x) for x in files[0].read_text().splitlines()][-len(lens):]
    chosen = scorer.score_texts([x["prompt"] for x in lines], [x["chosen"] for x in lines])
    rejected = scorer.score_texts([x["prompt"] for x in lines], [x["rejected"] for x in lines])
    np.testing.assert_allclose(chosen, ours, atol=tol)
    assert np.mean(np.asarray(chosen) > np.asarray(rejected)) == pytest.approx(summary["val_accuracy"])
    # A chat prompt with a generated reply renders (and is cut to the context) as a chat
    # preference row is.
    messages = [{"role": "user", "content": "Review of apple:"}]
    prompt, (reply,) = preference.split_prompt(tokenizer, messages, [[{"role": "assistant", "content": " great"}]], "")
    prompt, (reply,) = preference.fit(prompt, [reply], config.model.max_len, 0)
    assert scorer.encode(messages, " great") == prompt + reply and len(prompt + reply) == config.model.max_len
    # An empty completion (a stop at once) is the prompt and the end of the response alone.
    assert scorer.encode("Review of apple:", "") == preference.split_prompt(tokenizer, "Review of apple:", [""], "")[0] \
        + [tokenizer.eos_id]
    assert len(scorer.score_texts(["Review of apple:"] * 3, ["", " great", " river"])) == 3


def test_scorer_refuses_another_tokenizer_and_a_causal_lm(reward_run, files, tmp_path):
    workdir, _ = reward_run
    other = train_tokenizer(["something else entirely"] * 4, 270, ("<|endoftext|>",), trainer="lmlab",
                            directory=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="tokenizer differs from the policy's"):
        RewardModel.load(f"run:{workdir}", tokenizer=other)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="is not a reward model"):
        RewardModel.load(f"hf:{tmp_path / 'lm'}")
    with pytest.raises(ValueError, match="expected run:WORKDIR"):
        RewardModel.load(str(workdir))


def test_init_from_a_causal_lm_puts_a_fresh_score_head_on_its_trunk(files, tmp_path):
    # configs/llama.py:tiny's shape (its model keys must not contradict the checkpoint).
    config = llama_config(vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=176,
                          rope_theta=5e5, max_len=32)
    lm = GPT(config)
    params = nn.unbox(lm.init(jax.random.key(5), jnp.zeros((1, 4), jnp.int32))["params"])
    from models import hf

    hf.save_pretrained(lm, params, str(tmp_path / "lm"))
    load_tokenizer(str(files[1])).save(str(tmp_path / "lm"))
    run_config = _config(files, f"init_from=hf:{tmp_path / 'lm'}", "tokenizer.path=")
    r = trainer.setup(run_config, str(tmp_path / "run"))
    assert r.model.config.head == "score" and "lm_head" not in r.abstract_state.params
    state = init_from.initial_state(run_config, r.init_fn(jax.random.key(0)), r)
    np.testing.assert_array_equal(np.asarray(state.params["embed"]["embedding"]), params["embed"]["embedding"])
    assert 0.01 < float(np.std(np.asarray(state.params["score"]))) < 0.03  # fresh normal(0, 0.02)
    # A reward model checkpoint serves a reward run only.
    rm = GPT(dataclasses.replace(config, head="score"))
    hf.save_pretrained(rm, nn.unbox(rm.init(jax.random.key(5), jnp.zeros((1, 4), jnp.int32))["params"]),
                       str(tmp_path / "rm"), pad_token_id=0)
    lm_config = load_config(os.path.join(REPO, "configs/llama.py:tiny"), [f"init_from=hf:{tmp_path / 'rm'}", *QUIET])
    with pytest.raises(ValueError, match="a reward model: no LM head"):
        init_from.model(lm_config, 300)


def test_bad_preference_line_fails_in_one_line_naming_it(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = _pairs(6)
    lines[4]["rejected"] = lines[4]["chosen"]
    bad.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = _config(files, f"data.source=files:{bad}")
    with pytest.raises(ValueError, match=r"bad.jsonl:5: .*identical") as e:
        trainer.setup(config, str(tmp_path / "run"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused by the config check, before anything is written
    path, tokenizer = files
    bert = load_config(os.path.join(REPO, "configs/bert.py:tiny"), [
        "objective=reward", f"data.source=files:{path}", f"tokenizer.path={tokenizer}", *QUIET])
    with pytest.raises(ValueError, match="objective`='reward' trains a decoder"):
        trainer.setup(bert, str(tmp_path / "b"))


def test_pair_scores_read_each_rows_last_token(files):
    """The interleaved forward gives each row the score a lone pass gives it."""
    config = _config(files)
    tokenizer = load_tokenizer(config.tokenizer.path)
    model = build.model(config, tokenizer.vocab_size)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rows = _held_out(config, tokenizer)
    batch = {k: jnp.asarray(v[:2]) for k, v in rows.items()}
    chosen, rejected = pair_scores(model, params, batch)
    for b in range(2):
        for side, got in (("chosen", chosen), ("rejected", rejected)):
            n = int(rows[f"{side}_len"][b])
            alone = model.apply({"params": params}, jnp.asarray(rows[f"{side}_ids"][b:b + 1, :n]))[0, -1, 0]
            assert abs(float(alone) - float(got[b])) <= 1e-5 * max(1.0, abs(float(alone)))
