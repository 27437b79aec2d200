"""`python -m train.export`: a tiny run exported is what transformers loads and generates from
(the same greedy tokens as `inference.generate`); exports and `load_pretrained(verify=True)`
catch a conversion that changes a tensor, naming it; bad input is one line; init_from=run:
restores the run's params into a new run's layout."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from configs.loader import load_config
from tests.cli_output import assert_one_line_error, run_module
from train import export as export_lib
from train import init_from, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3


def _config(root, *overrides):
    return load_config(os.path.join(REPO, "configs/gpt.py:tiny"), [
        f"data.data_dir={root / 'tfds'}", "logging.progress_bar=false", "logging.peak_flops=1e11",
        f"steps={STEPS}", "schedule.warmup_steps=1", f"checkpoint.save_interval_steps={STEPS}",
        "eval.max_batches=1", "eval.num_samples=0",
        *overrides])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny `python -m train` run (GPT-2 layout, a BPE trained into its workdir)."""
    root = tmp_path_factory.mktemp("export")
    trainer.run(_config(root), str(root / "run"))
    return root


@pytest.fixture(scope="module")
def exported(run_dir):
    result = export_lib.export(str(run_dir / "run"), str(run_dir / "hf"))
    return run_dir / "hf", result


def test_export_loads_in_transformers_and_generates_the_same_tokens(run_dir, exported):
    out, result = exported
    assert result["step"] == STEPS and result["architecture"] == "GPT2LMHeadModel"
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    # The self-check ran against our reload and against transformers, both within float32 rounding.
    assert result["verified"]["reloaded"]["tensor"] == 0.0
    assert result["verified"]["transformers"]["logits"] < 1e-4

    from inference.generate import generate
    from inference.load import load

    ours = load(str(run_dir / "run"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "The function returns"
    ids = ours.tokenizer.encode(prompt)
    assert hf_tokenizer(prompt)["input_ids"] == ids
    eos = ours.tokenizer.eos_id
    expected = generate(ours.model, ours.params, [ids], max_new_tokens=12, stop_tokens=(eos,))[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, len(ids):].tolist()
    assert got == expected, (got, expected)


def test_a_corrupting_export_is_caught_and_leaves_nothing(run_dir, monkeypatch):
    from models import hf

    to_hf = hf.to_hf

    def corrupt(model, params):  # a conversion bug: one tensor written scaled
        config, tensors = to_hf(model, params)
        tensors["transformer.h.1.mlp.c_proj.weight"] = tensors["transformer.h.1.mlp.c_proj.weight"] * 1.5
        return config, tensors

    calls = {"n": 0}

    def first_call_only(model, params):  # save corrupts; the check's own conversions are honest
        calls["n"] += 1
        return corrupt(model, params) if calls["n"] == 1 else to_hf(model, params)

    monkeypatch.setattr(hf, "to_hf", first_call_only)
    out = run_dir / "corrupt"
    with pytest.raises(ValueError, match=r"worst tensor transformer\.h\.1\.mlp\.c_proj\.weight"):
        export_lib.export(str(run_dir / "run"), str(out), verify_transformers=False)
    assert not out.exists() and not [p for p in os.listdir(run_dir) if p.startswith("corrupt")]


def test_load_pretrained_verify_names_a_wrongly_converted_tensor(exported, monkeypatch):
    from models import hf
    from models.convert import gpt2

    out, _ = exported
    hf.load_pretrained(str(out), verify=True)  # an honest conversion passes
    honest = gpt2.hf_to_params

    def buggy(state_dict, config):
        params = honest(state_dict, config)
        params["layer_0"]["mlp"]["wi"] = params["layer_0"]["mlp"]["wi"][::-1]  # rows in the wrong order
        return params

    monkeypatch.setattr(gpt2, "hf_to_params", buggy)
    with pytest.raises(ValueError, match=r"worst tensor transformer\.h\.0\.mlp\.c_fc\.weight"):
        hf.load_pretrained(str(out), verify=True)


def test_export_refuses_a_non_empty_out_unless_forced(run_dir, exported):
    out, _ = exported
    result = run_module("train.export", f"--workdir={run_dir / 'run'}", f"--out={out}")
    assert_one_line_error(result, "is not empty", "--force")
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert before == (out / "model.safetensors").stat().st_mtime_ns


def test_export_of_a_workdir_without_checkpoints_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "checkpoints").mkdir()
    result = run_module("train.export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}")
    assert_one_line_error(result, "holds no committed checkpoint")
    assert not (tmp_path / "out").exists()


def test_export_of_a_model_without_a_transformers_class_is_refused(run_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run_dir / "run", workdir)
    meta = workdir / "checkpoints" / str(STEPS) / "config" / "metadata"
    saved = json.loads(meta.read_text())
    saved["model"]["block"]["norm"] = "rmsnorm"  # learned positions with RMSNorm: no transformers class
    meta.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        export_lib.export(str(workdir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_init_from_run_restores_its_params_into_a_sharded_layout(run_dir, tmp_path):
    config = _config(run_dir, f"init_from=run:{run_dir / 'run'}", "sharding.strategy=fsdp")
    r = trainer.setup(config, str(tmp_path / "new"))
    state = init_from.initial_state(config, r.init_fn(jax.random.key(1)), r)
    saved = export_lib._restore(init_from.Spec("run", str(run_dir / "run")), STEPS, r.model)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree_util.tree_leaves(saved)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    embedding = state.params["embed"]["embedding"]
    assert embedding.sharding.spec != jax.sharding.PartitionSpec()  # laid out by fsdp, not replicated


@pytest.fixture(scope="module")
def lora_run(run_dir):
    """A LoRA run (rsLoRA on GPT-2's out / MLP kernels: its fused qkv has one A for three) from
    the tiny run's weights."""
    config = _config(run_dir, "finetune.method=lora", "finetune.lora.targets=(out|wi|wo)$", "finetune.lora.rank=4",
                     "finetune.lora.rslora=true", "optimizer.lr=0.05", f"init_from=run:{run_dir / 'run'}")
    trainer.run(config, str(run_dir / "lora"))
    return run_dir / "lora"


def test_a_lora_run_exported_merged_generates_the_same_tokens_in_transformers(run_dir, lora_run):
    from inference.generate import generate
    from inference.load import load

    result = export_lib.export(str(lora_run), str(run_dir / "lora_hf"))
    assert result["verified"]["merged"]["logits"] < 1e-5 and result["verified"]["transformers"]["logits"] < 1e-4
    ours = load(str(lora_run))
    assert ours.model.config.block.peft.lora is not None  # the run's own LoRA model, its base from `frozen`
    ids = ours.tokenizer.encode("The function returns")
    eos = ours.tokenizer.eos_id
    expected = generate(ours.model, ours.params, [ids], max_new_tokens=12, stop_tokens=(eos,))[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "lora_hf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, len(ids):].tolist()
    assert got == expected, (got, expected)


def test_a_lora_run_exported_adapter_only_loads_in_peft_with_the_same_logits(run_dir, exported, lora_run):
    import peft

    from inference.load import load

    out = run_dir / "lora_adapter"
    result = export_lib.export(str(lora_run), str(out), adapter_only=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert result["verified"]["reloaded"]["tensor"] == 0.0
    ours = load(str(lora_run))
    # The adapter applies to the base the run started from: the tiny run, exported.
    base = transformers.AutoModelForCausalLM.from_pretrained(exported[0], dtype=torch.float32).eval()
    ids = np.asarray([ours.tokenizer.encode("The function returns a list of")], np.int32)
    with torch.no_grad():
        bare = base(torch.from_numpy(ids).long()).logits.numpy()
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()  # (adapts `base` in place)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids).long()).logits.numpy()
    want = np.asarray(ours.model.apply({"params": ours.params}, ids))
    # LoRA moved the logits away from the base's: the comparison sees the adapter.
    assert np.abs(bare - want).max() > 1e-3 * np.abs(want).max()
    np.testing.assert_allclose(theirs, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("method", ["prefix", "adapter"])
def test_prefix_and_adapter_runs_cannot_export_and_say_why(lora_run, tmp_path, method):
    workdir = tmp_path / "run"
    shutil.copytree(lora_run, workdir)
    meta = workdir / "checkpoints" / str(STEPS) / "config" / "metadata"
    saved = json.loads(meta.read_text())
    saved["finetune"]["method"] = method
    meta.write_text(json.dumps(saved))
    for adapter_only in (False, True):
        with pytest.raises(ValueError, match="cannot be merged" if not adapter_only else "--adapter_only cannot"):
            export_lib.export(str(workdir), str(tmp_path / "out"), adapter_only=adapter_only)
    assert not (tmp_path / "out").exists()
    if method == "prefix":  # the command line says it in one line
        result = run_module("train.export", f"--workdir={workdir}", f"--out={tmp_path / 'out'}")
        assert_one_line_error(result, "transformers has no", "--adapter_only")


def test_init_from_a_lora_run_starts_from_its_merged_weights(run_dir, lora_run, tmp_path):
    from inference.load import load
    from models.layers.peft import merge

    config = _config(run_dir, f"init_from=run:{lora_run}", "sharding.strategy=fsdp")
    r = trainer.setup(config, str(tmp_path / "new"))
    state = init_from.initial_state(config, r.init_fn(jax.random.key(1)), r)
    ours = load(str(lora_run))
    _, merged = merge(ours.model, ours.params)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=4 * np.finfo(np.float32).eps *
                                   float(np.abs(want).max()), err_msg=jax.tree_util.keystr(path))
