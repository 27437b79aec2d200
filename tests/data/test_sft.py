"""data.sft: TRL parity of ids and loss mask, packing that keeps the loss, BFD vs greedy
padding, resume, multi-process rows, and one-line errors for bad lines."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from data import packing, pydoc_chat, sft
from data.chat import BUILTIN_TEMPLATES
from data.pipeline import DataConfig
from data.tokenizer import ByteLevelBPE, load_tokenizer
from models.gpt import GPT, GPTConfig
from models.layers.blocks import BlockConfig

TEXT = "\n".join(m["content"] for r in pydoc_chat.conversations()[:60] for m in r["messages"])
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VARIED = [
    {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🙂?"},
                  {"role": "assistant", "content": "Bonjour! ça va."}, {"role": "user", "content": "日本語?"},
                  {"role": "assistant", "content": "はい。"}]},
    {"prompt": "Name a keyword.", "completion": "lambda"},
    {"messages": [{"role": "user", "content": "Write code"},
                  {"role": "assistant", "content": "def f(x):\n    return x  # <|im_end|> as text\n"}]},
    {"prompt": [{"role": "user", "content": "Two plus two?"}], "completion": [{"role": "assistant", "content": "4"}]},
]


def _data(path, **overrides) -> DataConfig:
    settings = {"source": f"files:{path}", "seq_len": 64, "batch_size": 4, "shuffle": False,
                "validation_fraction": 0.0, "num_epochs": 1}
    return DataConfig(**{**settings, **overrides})


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_chatml_dir(tmp_path_factory):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path_factory.mktemp("hf_chatml")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": BUILTIN_TEMPLATES["chatml"]}))
    return directory


@pytest.fixture(scope="module")
def bpe():
    return ByteLevelBPE.train(TEXT, 400, special_tokens=SPECIALS)


def test_ids_and_loss_mask_equal_trl_sft_trainer(hf_chatml_dir, tmp_path):
    """Rows (packing off) hold exactly TRL's input_ids, and loss_mask is 1 exactly where
    TRL's labels (next-token shifted) are not -100, with assistant_only_loss=True."""
    import datasets
    import transformers
    import trl
    records = [r for r in VARIED if "messages" in r] + pydoc_chat.conversations()[:12]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_chatml_dir))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(hf), n_layer=1, n_embd=8, n_head=2))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, packing=False,
                         max_length=None, report_to="none", use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf,
                             train_dataset=datasets.Dataset.from_list([{"messages": r["messages"]} for r in records]))
    expected = list(trainer.train_dataset)
    seq_len = max(len(e["input_ids"]) for e in expected)
    data = _data(path, seq_len=seq_len, batch_size=1)
    rows = list(sft.train_dataset(data, sft.SFTConfig(packing="none"), load_tokenizer(hf_chatml_dir)))
    assert len(rows) == len(expected) == len(records)
    for row, reference in zip(rows, expected):
        ids, labels = np.asarray(reference["input_ids"]), np.asarray(reference["labels"])
        n = len(ids) - 1
        np.testing.assert_array_equal(row["inputs"][0, :n], ids[:-1])
        np.testing.assert_array_equal(row["targets"][0, :n], ids[1:])
        np.testing.assert_array_equal(row["loss_mask"][0], np.pad(labels[1:] != -100, (0, seq_len - n)))
        assert row["loss_mask"].sum() > 0


def _token_losses(model, params, batches) -> dict[tuple, np.ndarray]:
    """Per-token NLL (0 off the loss mask) of each conversation in the rows (one forward
    pass), keyed by the conversation's input ids."""
    rows = {name: jnp.concatenate([b[name] for b in batches]) for name in batches[0]}

    @jax.jit
    def token_nll(rows):
        logits = model.apply({"params": params}, rows["inputs"], positions=rows["positions"],
                             segment_ids=rows["segment_ids"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), rows["targets"][..., None], -1)[..., 0]
        return jnp.where(rows["loss_mask"] > 0, nll, 0.0)

    nll, rows = np.asarray(token_nll(rows)), {k: np.asarray(v) for k, v in rows.items()}
    found = {}
    for r, segments in enumerate(rows["segment_ids"]):
        for segment in set(segments.tolist()) - {0}:
            where = segments == segment
            found[tuple(rows["inputs"][r][where].tolist())] = nll[r][where]
    return found


@pytest.mark.parametrize("strategy", ["greedy", "bfd"])
def test_packed_rows_give_the_loss_of_one_conversation_per_row(bpe, tmp_path, strategy):
    """Each conversation's per-token losses in packed rows (segment ids, restarted positions)
    equal those of the same conversation padded alone in a row, so the summed loss is equal.

    Bound: a token's NLL comes from the same inputs through the same operations within its
    segment; what differs is which masked-out keys sit in its attention row (their weights
    underflow to exactly 0) and how XLA tiles the reductions over D and V for a different
    batch. Per token that is within 8 * eps32 * sqrt(D + V) * (|NLL| + 1), a few ulps per
    layer. (Letting segments see each other, segment_ids = 1 on every real token, breaks
    this bound by two orders of magnitude on this model.)
    """
    records = pydoc_chat.conversations()[:24]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    data = _data(path, seq_len=256, batch_size=1)
    config = GPTConfig(vocab_size=bpe.vocab_size, num_layers=2, max_len=256,
                       block=BlockConfig(d_model=32, num_heads=2, d_ff=64))
    model = GPT(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    unpacked_rows = list(sft.train_dataset(data, sft.SFTConfig(packing="none"), bpe))
    packed_rows = list(sft.train_dataset(data, sft.SFTConfig(packing=strategy), bpe))
    assert len(packed_rows) < len(unpacked_rows)
    unpacked, packed = (_token_losses(model, params, rows) for rows in (unpacked_rows, packed_rows))
    assert packed.keys() == unpacked.keys() and len(unpacked) == len(unpacked_rows)
    eps = float(jnp.finfo(jnp.float32).eps)
    for key, expected in unpacked.items():
        bound = 8 * eps * np.sqrt(32 + config.vocab_size) * (np.abs(expected) + 1)
        assert np.all(np.abs(packed[key] - expected) <= bound)
    total = sum(float(v.sum()) for v in unpacked.values())
    assert abs(sum(float(v.sum()) for v in packed.values()) - total) <= 8 * eps * np.sqrt(
        32 + config.vocab_size) * (total + sum(int((v != 0).sum()) for v in unpacked.values()))


def test_rows_are_well_formed_and_every_target_counts_once(bpe, tmp_path):
    """Within a segment targets are the next inputs and positions count up; no loss on
    padding; every loss token of the data is in the rows once (bar the dropped last batch)."""
    tokenizer = bpe
    records = pydoc_chat.conversations()[:30]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    data = _data(path, seq_len=96, batch_size=3)
    train, _ = sft.examples(data, sft.SFTConfig(), tokenizer)
    total = sum(int(c["loss_mask"].sum()) for c in train)
    for strategy in packing.BIN_STRATEGIES:
        batches = list(sft.train_dataset(data, sft.SFTConfig(packing=strategy, pack_window=7), tokenizer))
        loss_tokens = 0
        for batch in batches:
            assert all(v.dtype == np.int32 and v.shape == (3, 96) for v in batch.values())
            seg = batch["segment_ids"]
            assert not np.any(batch["loss_mask"][seg == 0])
            same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
            np.testing.assert_array_equal(batch["inputs"][:, 1:][same], batch["targets"][:, :-1][same])
            np.testing.assert_array_equal(batch["positions"][:, 1:][same], batch["positions"][:, :-1][same] + 1)
            loss_tokens += int(batch["loss_mask"].sum())
        # Only the last partial batch (< 3 rows) is dropped.
        assert total - loss_tokens <= 2 * 96


def test_bfd_pads_no_more_than_greedy_and_equals_trl_bins():
    import datasets
    import trl.data_utils as trl_utils
    for seed in range(3):
        lengths = [int(x) for x in np.random.default_rng(seed).integers(1, 200, size=300)]
        fractions = {s: packing.padding_fraction(lengths, 256, s) for s in packing.BIN_STRATEGIES}
        assert fractions["bfd"] <= fractions["greedy"] <= fractions["none"]
        assert 0 <= fractions["bfd"] < fractions["greedy"]
        bins = packing.best_fit_decreasing(lengths, 256)
        assert sorted(i for b in bins for i in b) == list(range(300))
        assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
        ids = [[i] * n for i, n in enumerate(lengths)]
        packed = trl_utils.pack_dataset(datasets.Dataset.from_dict({"input_ids": ids}), 256, "bfd")
        assert [[lengths[i] for i in b] for b in bins] == [list(r["seq_lengths"]) for r in packed]


def test_padding_fractions_on_pydoc_chat(bpe, tmp_path):
    data = DataConfig(source="pydoc_chat", data_dir=str(tmp_path), seq_len=256, validation_fraction=0.0)
    fractions = sft.padding_fractions(data, sft.SFTConfig(), bpe)
    assert (tmp_path / "pydoc_chat.jsonl").is_file()
    assert fractions["bfd"] <= fractions["greedy"] < fractions["none"]


@pytest.mark.parametrize("strategy", ["greedy", "bfd"])
def test_resume_continues_exactly(bpe, tmp_path, strategy):
    path = _write_jsonl(tmp_path / "chat.jsonl", pydoc_chat.conversations()[:40])
    data = _data(path, seq_len=96, batch_size=2, shuffle=True, shuffle_window=4, num_epochs=None)
    config = sft.SFTConfig(packing=strategy, pack_window=9)
    reference = sft.train_iterator(data, config, bpe)
    for _ in range(5):
        next(reference)
    state = reference.get_state()
    json.dumps(state)
    expected = [next(reference) for _ in range(12)]
    resumed = sft.train_iterator(data, config, bpe)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_processes_hold_their_slices_of_the_global_batch(bpe, tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", pydoc_chat.conversations()[:30])
    data = _data(path, seq_len=96, batch_size=4, validation_fraction=0.3)
    config = sft.SFTConfig(packing="bfd")
    for split in (sft.train_dataset, sft.eval_dataset):
        whole = list(split(data, config, bpe, process_index=0, process_count=1))
        parts = [list(split(data, config, bpe, process_index=p, process_count=2)) for p in range(2)]
        assert len(whole) == len(parts[0]) == len(parts[1]) > 0
        for batch, first, second in zip(whole, *parts):
            for name in batch:
                np.testing.assert_array_equal(np.concatenate([first[name], second[name]]), batch[name])


def test_validation_split_and_eval_passes(bpe, tmp_path):
    records = pydoc_chat.conversations()[:20]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    data = _data(path, seq_len=256, batch_size=4, validation_fraction=0.25)
    train, validation = sft.examples(data, sft.SFTConfig(), bpe)
    assert (len(train), len(validation)) == (15, 5)
    first = sft.eval_batches(data, sft.SFTConfig(packing="bfd"), bpe)
    second = sft.eval_batches(data, sft.SFTConfig(packing="bfd"), bpe)
    assert sum(int(b["loss_mask"].sum()) for b in first) == sum(int(c["loss_mask"].sum()) for c in validation)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_prompt_completion_plain_text_without_a_template(tmp_path):
    bpe = ByteLevelBPE.train(TEXT, 300)  # no chat template, bos = eos = <|endoftext|>
    ids, mask = sft.encode_record(bpe, {"prompt": "Name a keyword:", "completion": " lambda"})
    prompt, completion = bpe.encode("Name a keyword:"), bpe.encode(" lambda")
    assert ids == [bpe.bos_id, *prompt, *completion, bpe.eos_id]
    assert mask == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)
    chat_ids, chat_mask = sft.encode_record(bpe, {"prompt": "Name a keyword:", "completion": " lambda"},
                                            template="chatml")
    assert bpe.decode([i for i, m in zip(chat_ids, chat_mask) if m]) == " lambda<|im_end|>"


def test_long_conversations_are_truncated_and_unmasked_ones_dropped(bpe, tmp_path):
    long_answer = "word " * 200
    records = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": long_answer}]},
               {"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "A"}]},
               VARIED[0]]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    train, _ = sft.examples(_data(path, seq_len=32), sft.SFTConfig(), bpe)
    assert len(train) == 2 and len(train[0]["inputs"]) == 32
    ids, _ = sft.encode_record(bpe, records[0])
    np.testing.assert_array_equal(train[0]["inputs"], ids[:32])


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "has no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"text": "hi"}', "a line must be"),
    ('{"prompt": "a", "completion": 3}', "both be strings"),
])
def test_bad_lines_are_one_line_errors_naming_file_and_line(bpe, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(VARIED[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        sft.examples(_data(path), sft.SFTConfig(), bpe)
    assert str(info.value).startswith(f"{path}:2: ") and "\n" not in str(info.value)


def test_template_that_fails_to_render_names_the_line(bpe, tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", VARIED[:2])
    failing = ("{% if messages|length > 2 %}{{ raise_exception('at most one turn') }}{% endif %}"
               "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}")
    with pytest.raises(ValueError, match=rf"{path}:2: the chat template failed to render: at most one turn"):
        sft.examples(_data(path), sft.SFTConfig(template=failing), bpe)
    untagged = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=rf"{path}:1: the chat template marks no assistant token"):
        sft.examples(_data(path), sft.SFTConfig(template=untagged), bpe)
