"""train/validate.py: a bad config fails at once, naming the key, and nothing is written.

Runs in-process on the 8 simulated CPU devices of tests/conftest.py; the CLI side (one
line, no traceback) is tests/train/test_cli.py.
"""

import os

import jax.numpy as jnp
import pytest

from configs.loader import load_config
from train import validate
from train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(*overrides):
    return load_config(os.path.join(REPO, "configs/gpt.py:tiny"), list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["model.family=gpt5"], r"config key `model.family`='gpt5'; expected one of"),
    (["model.block.norm=batchnorm"], r"config `model`: norm='batchnorm'; expected one of"),
    (["model.remat=sometimes"], r"remat"),
    (["schedule.name=linear"], r"config `optimizer` or `schedule`: .*linear"),
    (["steps=3"], r"warmup_steps=5 must be in \[0, total_steps=3\]"),
    (["data.batch_size=0"], r"config key `data.batch_size`=0 must be >= 1"),
    (["checkpoint.max_to_keep=0"], r"config key `checkpoint.max_to_keep`=0 must be >= 1"),
    (["sharding.strategy=zero9"], r"unknown sharding strategy 'zero9'"),
    (["sharding.mesh=data=3"], r"config key `sharding.mesh`: .* 3 slots but there are 8 devices; .* product is 8"),
    (["sharding.strategy=tp", "sharding.mesh=tensor=8"], r"tensor"),  # 4 heads do not split 8 ways
    (["model.moe.num_experts=4", "model.moe.dispatch=all_to_all"],
     (r"`model.moe.dispatch`='all_to_all' .* sharding.strategy='dp' does not split the experts.* use "
      r"sharding.strategy=ep")),
    # Context parallelism (sharding.strategy=cp: data=2 x context=4 by default).
    (["sharding.strategy=cp"], r"`sharding.strategy`='cp' splits the sequence .* set model.block.attention_impl=ring"),
    (["sharding.strategy=cp", "model.block.attention_impl=ring", "data.seq_len=12"],
     r"cuts the sequence \(data.seq_len = 12\) into 2 x 4 zig-zag chunks .* a multiple of 8"),
    (["sharding.strategy=cp", "model.block.attention_impl=ring", "model.block.attention_dropout_rate=0.1"],
     r"`model.block.attention_impl`='ring' has no weight matrix to drop out"),
    (["sharding.strategy=cp", "model.block.attention_impl=ring", "model.mtp_depth=1"],
     r"reorders the tokens \(zig-zag\), but multi-token prediction .* set model.mtp_depth=0"),
    (["sharding.strategy=tp_sp", "model.block.attention_impl=ring"],
     r"'ring' passes key/value chunks around the `context` mesh axis, but strategy 'tp_sp'"),
    (["data.batch_size=4"], r"of 8 devices, but the batch has 4 rows \(data.batch_size"),  # dp over 8
    (["optimizer.grad_accum_steps=3"], r"not divisible by optimizer.grad_accum_steps=3"),
    (["tokenizer.vocab_size=100"], r"config key `tokenizer.vocab_size`=100 is too small .* at least 257"),
    (["data.source=parquet:/x"], r"config key `data.source`: unknown data source"),
    (["data.source=files:/no/such/file.txt"], r"data file /no/such/file.txt does not exist"),
    (["data.source=files:/no/such/*.txt"], r"matches no file"),
    (["data.validation_fraction=1.5"], r"`data.validation_fraction`=1.5 must lie in \(0, 1\)"),
    (["data.eval_split=test"], r"`data.eval_split`='test'; the embedded source has the splits"),
    (["tokenizer.path=/no/such/tokenizer"], r"config key `tokenizer.path`: .* does not exist"),
    (["objective=orpo_typo"], r"config key `objective`='orpo_typo'; expected one of \(.*'lm', 'mlm'"),
    (["objective=mlm"], r"`objective`='mlm' \(masked LM\) needs model.family='bert', got 'gpt'"),
    (["finetune.method=ia3"], r"config key `finetune.method`='ia3'; expected one of \('full', 'lora'"),
    (["finetune.method=lora", "finetune.lora.rank=0"], r"config key `finetune.lora.rank`=0 must be >= 1"),
    (["finetune.method=lora", "finetune.lora.alpha=0"], r"config key `finetune.lora.alpha`=0.0 must be > 0"),
    (["finetune.method=lora", "finetune.lora.dropout=1.0"], r"`finetune.lora.dropout`=1.0 must be < 1"),
    (["finetune.method=qlora", "finetune.qlora.quant=fp4"], r"`finetune.qlora.quant`='fp4'; expected one of"),
    (["finetune.method=prefix", "finetune.prefix.length=0"], r"`finetune.prefix.length`=0 must be >= 1"),
    (["finetune.method=adapter", "finetune.adapter.kind=serial"], r"`finetune.adapter.kind`='serial'; expected"),
    (["finetune.freeze=no_such_module"], r"config key `finetune.freeze`='no_such_module' matches no parameter; "
                                         r"parameter paths are '/'-joined, e.g. .*: fix the regex"),
    (["finetune.freeze=["], r"config key `finetune.freeze`='\[' is not a regular expression"),
    (["finetune.freeze=."], r"`finetune.freeze`='.' freezes every parameter: nothing would train"),
    (["finetune.method=lora", "finetune.freeze=layer_0"], r"`finetune.freeze` is set but finetune.method='lora'"),
    (["finetune.method=lora", "finetune.train=no_such_head"], r"`finetune.train`='no_such_head' matches no"),
    # Checked on the model's own parameters before anything runs (issue 11's bad input).
    (["finetune.method=lora", "finetune.lora.targets=no_such_kernel"],
     r"finetune.lora.targets='no_such_kernel' matches no kernel"),
    (["finetune.method=qlora", "finetune.lora.rank=100000"], r"finetune.lora.rank=100000 exceeds kernel"),
    (["model.block.attention_impl=flash"], r"config key `model.block.attention_impl`='flash'; expected one of "
                                          r"\('xla', 'blockwise', 'pallas', 'cudnn', 'ring'\)"),
    (["model.block.attention_impl=cudnn"], r"`model.block.attention_impl`='cudnn' needs a GPU, but the JAX "
                                           r"backend is 'cpu'; use blockwise or xla"),
    (["sharding.pipeline_schedule=zigzag"], r"config key `sharding.pipeline_schedule`='zigzag'; expected one of"),
    (["sharding.pipeline_schedule=1f1b"], (r"`sharding.pipeline_schedule`='1f1b': the training step pipelines "
                                           r"with gpipe; .* sharding.pipeline.one_f_one_b")),
    (["sharding.pipeline_microbatches=0"], r"config key `sharding.pipeline_microbatches`=0 must be >= 1"),
    (["sharding.strategy=pp"], r"`sharding.strategy`='pp' splits the stacked layers .* set model.scan_layers=True"),
    (["sharding.strategy=pp", "model.scan_layers=True", "model.num_layers=3"],
     r"config key `model.num_layers`=3 does not split into the 2 pipeline stages"),
    (["sharding.strategy=pp", "model.scan_layers=True", "model.num_layers=2"],  # 8 rows, 4 micro-batches, data=4
     r"`sharding.pipeline_microbatches`: .* 8 rows .*pipeline_microbatches=4 .* 4 batch devices; .*multiple of 16"),
    (["model.block.attention_impl=blockwise", "model.block.attention_dropout_rate=0.1"],
     r"`model.block.attention_impl`='blockwise' has no weight matrix to drop out; set "
     r"model.block.attention_dropout_rate=0"),
])
def test_a_bad_config_is_named_before_anything_is_written(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        validate.check(_config(*overrides), str(workdir))
    assert not workdir.exists()


def test_a_masked_lm_needs_a_tokenizer_with_a_mask_token(tmp_path):
    from data.tokenizer import ByteLevelBPE

    ByteLevelBPE.train("some text to learn merges from " * 20, 300).save(str(tmp_path / "bpe"))
    config = load_config(os.path.join(REPO, "configs/bert.py:tiny"), [f"tokenizer.path={tmp_path / 'bpe'}"])
    with pytest.raises(ValueError, match="no mask token"):
        validate.check(config, str(tmp_path / "run"))


def test_data_files_must_be_readable_non_empty_and_of_a_known_kind(tmp_path):
    empty, csv, locked = tmp_path / "empty.txt", tmp_path / "table.csv", tmp_path / "locked.txt"
    empty.write_text("")
    csv.write_text("a,b\n")
    locked.write_text("text")
    locked.chmod(0)
    with pytest.raises(ValueError, match=r"data file .*empty.txt is empty"):
        validate.check(_config(f"data.source=files:{empty}"), str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"data file .*table.csv has an unknown suffix"):
        validate.check(_config(f"data.source=files:{csv}"), str(tmp_path / "run"))
    if os.geteuid() != 0:  # root reads any file
        with pytest.raises(ValueError, match=r"data file .*locked.txt cannot be read"):
            validate.check(_config(f"data.source=files:{locked}"), str(tmp_path / "run"))


@pytest.mark.parametrize("spec", ["gpt.py:default", "gpt.py:tiny", "llama.py:tiny", "qwen.py:tiny", "moe.py:tiny",
                                  "deepseek.py:tiny", "bert.py:tiny"])
def test_every_family_preset_passes(tmp_path, spec):
    validate.check(load_config(os.path.join(REPO, "configs", spec)), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_sharded_config_passes(tmp_path):
    validate.check(_config("sharding.strategy=fsdp_tp", "sharding.mesh=fsdp=4,tensor=2"), str(tmp_path / "b"))
    validate.check(_config("sharding.strategy=fsdp_cp", "sharding.mesh=fsdp=2,context=4",
                           "model.block.attention_impl=ring"), str(tmp_path / "c"))


def test_a_pipelined_config_passes(tmp_path):
    validate.check(_config("sharding.strategy=pp_fsdp_tp", "sharding.mesh=stage=2,fsdp=2,tensor=2",
                           "model.scan_layers=True", "model.num_layers=2"), str(tmp_path / "b"))


def _saved_run(workdir, config):
    """A workdir whose checkpoint holds `config`, as `python -m train` saves it."""
    with Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(10, {"step": jnp.int32(10)}, data_state={}, config=config.to_dict(), force=True)


def test_a_resume_that_changes_parameter_shapes_is_refused_naming_the_keys(tmp_path):
    _saved_run(tmp_path, _config())
    validate.check(_config("steps=60", "optimizer.lr=1e-4"), str(tmp_path))  # same shapes: resumes
    with pytest.raises(ValueError, match=r"other parameter shapes \(e.g. \['layer_0'\]\['mlp'\]\['wi'\]: "
                                         r".*changed config keys: model.block.d_ff \(256 -> 1024\)\. Resume"):
        validate.check(_config("model.block.d_ff=1024"), str(tmp_path))
    with pytest.raises(ValueError, match=r"changed config keys: model.num_layers \(2 -> 3\)"):
        validate.check(_config("model.num_layers=3"), str(tmp_path))
    with pytest.raises(ValueError, match=r"model.param_dtype \('float32' -> 'bfloat16'\)"):
        validate.check(_config("model.param_dtype=bfloat16"), str(tmp_path))
