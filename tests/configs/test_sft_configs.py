"""configs/sft.py presets: every key is a base key, and their sft data builds rows."""

import pytest

from configs import sft as sft_configs
from configs.loader import load_config
from data import pipeline, pydoc_chat
from data import sft as sft_data
from data.tokenizer import ByteLevelBPE


@pytest.mark.parametrize("preset", sft_configs.PRESETS)
def test_presets_load_and_their_chat_data_packs(preset, tmp_path):
    c = load_config(f"configs/sft.py:{preset}", [])
    assert c.objective == "sft" and c.init_from.startswith("run:")
    assert c.data.seq_len <= c.model.max_len
    options = sft_data.SFTConfig(template=c.sft.chat_template, packing=c.sft.packing, pack_window=c.sft.pack_window)
    # The base run's tokenizer: a BPE of the preset's vocabulary with only <|endoftext|>.
    text = "\n".join(m["content"] for r in pydoc_chat.conversations() for m in r["messages"])
    tokenizer = ByteLevelBPE.train(text, c.tokenizer.vocab_size)
    data = pipeline.DataConfig(source=c.data.source, data_dir=str(tmp_path), seq_len=c.data.seq_len,
                               batch_size=c.data.batch_size, validation_fraction=c.data.validation_fraction)
    train, validation = sft_data.examples(data, options, tokenizer)
    assert len(train) >= 100 and validation
    batch = next(sft_data.train_iterator(data, options, tokenizer))
    assert batch["inputs"].shape == (c.data.batch_size, c.data.seq_len) and batch["loss_mask"].sum() > 0
    fractions = sft_data.padding_fractions(data, options, tokenizer)
    assert fractions["bfd"] <= fractions["greedy"]
