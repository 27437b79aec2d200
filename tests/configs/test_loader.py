"""Config files load with presets and overrides; bad keys and values fail naming the key."""

import pytest

from configs.loader import ConfigError, apply_overrides, load_config, split_override_args


def test_preset_and_overrides_apply_with_types():
    c = load_config("configs/gpt.py:tiny", ["optimizer.lr=3e-4", "config.steps=7", "data.split_paragraphs=true",
                                            "model.dtype=bfloat16"])
    assert c.optimizer.lr == pytest.approx(3e-4) and isinstance(c.optimizer.lr, float)
    assert c.steps == 7 and c.data.split_paragraphs is True and c.model.dtype == "bfloat16"
    assert c.model.num_layers == 2  # the tiny preset, not the default


@pytest.mark.parametrize("override,message", [
    ("optimizer.lrr=1", r"config key `optimizer.lrr` does not exist; did you mean `optimizer.lr`"),
    ("optimiser.lr=1", r"`optimiser.lr` does not exist; did you mean `optimizer.lr`"),
    ("steps=2.5", r"config key `steps` expects int, got '2.5'"),
    ("data.shuffle_seed=abc", r"`data.shuffle_seed` expects int"),
    ("data.split_paragraphs=maybe", r"`data.split_paragraphs` expects bool"),
    ("optimizer.lr", r"must look like key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/gpt.py:tiny", [override])


def test_config_is_locked_after_loading():
    c = load_config("configs/gpt.py:tiny")
    with pytest.raises(AttributeError):
        c.optimizer.new_key = 1
    with pytest.raises(TypeError):
        c.steps = "many"


def test_bad_file_and_preset():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py:tiny")
    with pytest.raises(ConfigError, match="unknown gpt preset 'huge'"):
        load_config("configs/gpt.py:huge")


def test_every_gpt_preset_has_the_base_keys():
    from configs import base, gpt

    def keys(c, prefix=""):
        out = set()
        for k, v in c.items():
            out |= keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
        return out

    for preset in gpt.PRESETS:
        assert keys(gpt.get_config(preset)) == keys(base.get_config())


def test_split_override_args():
    rest, overrides = split_override_args(["prog", "--workdir=/x", "--config=a.py:b", "--config.steps=3"])
    assert rest == ["prog", "--workdir=/x", "--config=a.py:b"] and overrides == ["steps=3"]


def test_apply_overrides_keeps_unrelated_keys():
    c = load_config("configs/gpt.py:tiny")
    before = c.to_dict()
    apply_overrides(c, ["eval.temperature=0.5"])
    after = c.to_dict()
    assert after["eval"]["temperature"] == 0.5
    after["eval"]["temperature"] = before["eval"]["temperature"]
    assert after == before


def test_shipped_configs_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/gpt.py:tiny", ["steps=3"])
    assert config.steps == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("my_configs/gpt.py")


def test_with_defaults_fills_keys_newer_than_a_saved_config_and_keeps_saved_values():
    """A run config saved before `train.*`, `model.loss_chunk_size` and `model.block.attention_impl`
    existed loads with their defaults, and every key it did save keeps the saved value."""
    from configs import base
    from configs.loader import with_defaults

    saved = base.get_config().to_dict()
    del saved["train"]
    del saved["model"]["loss_chunk_size"]
    del saved["model"]["block"]["attention_impl"]
    saved["model"]["num_layers"] = 7
    saved["model"]["block"]["d_model"] = 96
    config = with_defaults(saved)
    assert config.train.compilation_cache_dir == base.get_config().train.compilation_cache_dir
    assert config.model.loss_chunk_size == 0 and config.model.block.attention_impl == "xla"
    assert config.model.num_layers == 7 and config.model.block.d_model == 96
    assert "train" not in saved and "loss_chunk_size" not in saved["model"]  # the caller's dict is unchanged
