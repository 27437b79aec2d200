"""Starting weights (`config.init_from`): hf: loads leaf by leaf into the strategy's layout
(each device only its slice, host memory near one tensor), run: restores a run's params,
and a config that contradicts the checkpoint's shapes is one error naming the keys."""

import os
import tracemalloc

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import base
from models import hf
from sharding import mesh as mesh_lib
from sharding.strategies import get_strategy
from train import build, init_from
from train import program as program_lib

# Sizes where the tensors dwarf the bookkeeping: embedding and head 4096 x 256 (4 MiB each).
V, D, F, L = 4096, 256, 512, 2


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root)
    return str(root)


def _config(llama_dir, *overrides):
    c = base.get_config()
    c.init_from = f"hf:{llama_dir}"
    c.data.update(seq_len=32, batch_size=8)
    for item in overrides:
        key, value = item.split("=")
        node = c
        for part in key.split(".")[:-1]:
            node = node[part]
        node[key.split(".")[-1]] = type(node[key.split(".")[-1]])(value)
    return c


def _abstract(config, model):
    tx, schedule = build.optimizer(config)
    strategy = get_strategy(config.sharding.strategy)
    mesh = mesh_lib.make_mesh(config.sharding.mesh or strategy.default_mesh)
    return program_lib.build_for_run(config, model, tx, schedule, strategy=strategy, mesh=mesh).abstract_state.params


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_hf_loads_shard_by_shard_into_the_layout(llama_dir, strategy):
    config = _config(llama_dir, f"sharding.strategy={strategy}")
    model = build.model(config, V)
    abstract = _abstract(config, model)
    _, expected = hf.load_pretrained(llama_dir)
    largest = max(x.nbytes for x in jax.tree_util.tree_leaves(expected))
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(expected))

    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    params = init_from.initial_params(config, abstract, model)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The host held about one tensor (read + converted copy) at a time, never the model.
    print(f"{strategy}: peak extra host memory {(peak - start) / 2**20:.2f} MiB; largest tensor "
          f"{largest / 2**20:.2f} MiB; model {total / 2**20:.2f} MiB")
    assert peak - start <= 2.25 * largest < total

    per_device = {d: 0 for d in jax.devices()}
    for leaf in jax.tree_util.tree_leaves(params):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    # Every dimension this model shards divides by 8: each device holds exactly 1/8.
    print(f"{strategy}: per-device parameter bytes {sorted(set(per_device.values()))} of {total}")
    assert set(per_device.values()) == {total // 8}
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_contradicting_model_keys_are_one_error_naming_them(llama_dir):
    config = _config(llama_dir, "model.num_layers=3", "model.block.d_model=96", "model.remat=full")
    with pytest.raises(ValueError) as e:
        build.model(config, V)
    message = str(e.value)
    assert f"model.num_layers=3 but hf:{llama_dir} has 2" in message
    assert f"model.block.d_model=96 but hf:{llama_dir} has 256" in message
    assert "remat" not in message  # a run setting, not a shape


def test_run_settings_apply_to_the_checkpoint_model(llama_dir):
    model = build.model(_config(llama_dir, "model.dtype=bfloat16", "model.remat=full"), V)
    assert model.config.num_layers == L and model.config.block.d_model == D and not model.config.tie_embeddings
    assert model.config.remat == "full" and model.config.block.dtype.__name__ == "bfloat16"


@pytest.mark.parametrize("value, fragment", [("hf:/nonexistent/dir", "is not a directory"),
                                             ("weights:/x", "expected hf:DIR"),
                                             ("run:/tmp@x", "must be a number")])
def test_bad_init_from_is_a_clear_error(value, fragment):
    config = base.get_config()
    config.init_from = value
    with pytest.raises((ValueError, FileNotFoundError), match=fragment):
        init_from.check(config)


def test_a_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    config = base.get_config()
    config.init_from = f"hf:{tmp_path}"
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        init_from.check(config)
    assert os.listdir(tmp_path) == ["config.json"]


def test_scanned_layers_and_peft_leaves(llama_dir):
    """scan_layers stacks the per-layer tensors as load_pretrained does; a leaf the checkpoint
    lacks keeps its init if it is a PEFT parameter, and is an error otherwise."""
    config = _config(llama_dir, "model.scan_layers=true")
    model = build.model(config, V)
    abstract = _abstract(config, model)
    _, expected = hf.load_pretrained(llama_dir, scan_layers=True)
    sharding = jax.tree_util.tree_leaves(abstract)[0].sharding
    extra = {"layers": {"self_attention": {"query_lora_a": jax.ShapeDtypeStruct((L, D, 4), np.float32,
                                                                                 sharding=sharding)}}}
    lora_init = jax.device_put(np.full((L, D, 4), 0.5, np.float32), sharding)
    with_lora = _merge(abstract, extra)
    current = _merge(jax.tree_util.tree_map(lambda x: jax.numpy.zeros(x.shape, x.dtype), abstract),
                     {"layers": {"self_attention": {"query_lora_a": lora_init}}})
    params = init_from.initial_params(config, with_lora, model, current=current)
    assert np.array_equal(np.asarray(params["layers"]["self_attention"]["query_lora_a"]), np.asarray(lora_init))
    del params["layers"]["self_attention"]["query_lora_a"]
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    extra["layers"]["self_attention"] = {"query_scale": extra["layers"]["self_attention"]["query_lora_a"]}
    with pytest.raises(ValueError, match="has no weights for .*layers/self_attention/query_scale"):
        init_from.initial_params(config, _merge(abstract, extra), model, current=current)


def _merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out
