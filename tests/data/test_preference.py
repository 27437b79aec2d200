"""data.preference: TRL parity of the prompt/response split (DPO and KTO tokenization, plain
text and chat), truncation, the batch layout, KTO's mismatched KL rows, resume,
multi-process rows, the validation split, and one-line errors for bad lines."""

import copy
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from data import preference, pydoc_chat
from data.chat import BUILTIN_TEMPLATES
from data.pipeline import DataConfig
from data.tokenizer import load_tokenizer

TEXT = "\n".join(m["content"] for r in pydoc_chat.conversations()[:60] for m in r["messages"])
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLAIN = [
    {"prompt": "What is a list?", "chosen": " A mutable sequence.", "rejected": " A kind of dog."},
    {"prompt": "Name a keyword", "chosen": ": lambda", "rejected": ": banana"},
    {"prompt": "Héllo 🙂", "chosen": " Bonjour! ça va.", "rejected": "日本語?"},
    {"prompt": "def f(x):", "chosen": "\n    return x", "rejected": "\n    pass"},
]
CHAT = [
    {"prompt": [{"role": "user", "content": "Two plus two?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a dict?"}],
     "chosen": [{"role": "assistant", "content": "A mapping."}],
     "rejected": [{"role": "assistant", "content": "A list of words, sorted."}]},
]
# Without a prompt field: the shared leading messages are the prompt (TRL's extract_prompt).
IMPLICIT = [
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "7, I think"}]},
]


def _data(path, **overrides) -> DataConfig:
    settings = {"source": f"files:{path}", "seq_len": 64, "batch_size": 2, "shuffle": False,
                "validation_fraction": 0.0, "num_epochs": 1}
    return DataConfig(**{**settings, **overrides})


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _hf_dir(directory, *, chat_template=None):
    """A byte-level BPE tokenizer.json whose transformers tokenizer adds BOS (<|endoftext|>)
    to plain text, as Llama's does, so TRL's `tokenizer(text)` and our `[bos] + encode` agree."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>"}
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory.mktemp("chat"), chat_template=BUILTIN_TEMPLATES["chatml"])


def _trl_dataset(directory, records, tmp_path, *, kto=False):
    """TRL's own tokenization of `records` (its trainer's prepared train_dataset)."""
    import datasets
    import transformers
    import trl

    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(hf), n_layer=1, n_embd=8, n_head=2))
    common = {"report_to": "none", "use_cpu": True, "max_length": None, "per_device_train_batch_size": 2}
    if kto:
        args = trl.KTOConfig(output_dir=str(tmp_path / "kto"), **common)
        trainer = trl.KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=hf,
                                 train_dataset=datasets.Dataset.from_list(records))
    else:
        args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), **common)
        trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=hf,
                                 train_dataset=datasets.Dataset.from_list(records))
    return list(trainer.train_dataset)


def _unpadded(ids_T, mask_T, length):
    return list(ids_T[:length]), list(mask_T[:length])


@pytest.mark.parametrize("kind", ["plain", "chat", "implicit"])
def test_pairs_equal_trl_dpo_tokenization(kind, plain_dir, chat_dir, tmp_path):
    """Each row is TRL's prompt_ids + chosen_ids (rejected_ids), its mask exactly the response."""
    directory, records = {"plain": (plain_dir, PLAIN), "chat": (chat_dir, CHAT), "implicit": (chat_dir, IMPLICIT)}[kind]
    expected = _trl_dataset(directory, records, tmp_path)
    path = _write_jsonl(tmp_path / "pairs.jsonl", records)
    data = _data(path, batch_size=len(records))
    rows = next(preference.train_iterator(data, preference.PreferenceConfig(), load_tokenizer(str(directory))))
    for i, e in enumerate(expected):
        for side in ("chosen", "rejected"):
            ids, mask = _unpadded(rows[f"{side}_ids"][i], rows[f"{side}_mask"][i], rows[f"{side}_len"][i])
            assert ids == e["prompt_ids"] + e[f"{side}_ids"], (i, side)
            assert mask == [0] * len(e["prompt_ids"]) + [1] * len(e[f"{side}_ids"]), (i, side)
            assert not rows[f"{side}_ids"][i, rows[f"{side}_len"][i]:].any()
    assert list(rows["index"]) == list(range(len(records)))
    assert rows["margin"].dtype == np.float32 and not rows["margin"].any()


def test_unpaired_rows_equal_trl_kto_tokenization(plain_dir, tmp_path):
    """KTO rows: TRL's prompt_ids + completion_ids, and its KL rows the prompt with
    KL_completion_ids (the completion of the previous row of the chunk)."""
    records = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
               for i, r in enumerate(PLAIN)]
    expected = _trl_dataset(plain_dir, records, tmp_path, kto=True)
    path = _write_jsonl(tmp_path / "kto.jsonl", records)
    data = _data(path, batch_size=2)
    rows = preference.splits(data, preference.PreferenceConfig(unpaired=True), load_tokenizer(str(plain_dir)))[0]
    for i, e in enumerate(expected):
        prompt = e["prompt_ids"]
        assert _unpadded(rows["ids"][i], rows["mask"][i], rows["len"][i]) == (
            prompt + e["completion_ids"], [0] * len(prompt) + [1] * len(e["completion_ids"]))
        assert _unpadded(rows["kl_ids"][i], rows["kl_mask"][i], rows["kl_len"][i]) == (
            prompt + e["KL_completion_ids"], [0] * len(prompt) + [1] * len(e["KL_completion_ids"]))
        assert rows["label"][i] == int(e["label"])


def test_fit_keeps_the_response_and_cuts_the_prompt_from_the_left():
    prompt, response, short = list(range(10)), [100, 101, 102], [200]
    assert preference.fit(prompt, [response, short], 20) == (prompt, [response, short])
    assert preference.fit(prompt, [response, short], 20, max_prompt_len=4) == ([6, 7, 8, 9], [response, short])
    assert preference.fit(prompt, [response, short], 8) == ([5, 6, 7, 8, 9], [response, short])
    # The response alone fills the row: one prompt token stays as its context, its end is cut.
    assert preference.fit(prompt, [list(range(100, 110))], 6) == ([9], [[100, 101, 102, 103, 104]])


def test_rows_at_seq_len_and_prompt_budget(plain_dir, tmp_path):
    """Truncated rows are exactly `fit` of the untruncated tokenization."""
    tokenizer = load_tokenizer(str(plain_dir))
    path = _write_jsonl(tmp_path / "p.jsonl", PLAIN)
    full = preference.splits(_data(path, seq_len=64), preference.PreferenceConfig(), tokenizer)[0]
    cut = preference.splits(_data(path, seq_len=9), preference.PreferenceConfig(max_prompt_len=3), tokenizer)[0]
    for i in range(len(PLAIN)):
        pair = []
        for side in ("chosen", "rejected"):
            ids, mask = _unpadded(full[f"{side}_ids"][i], full[f"{side}_mask"][i], full[f"{side}_len"][i])
            pair.append((ids[:mask.index(1)], ids[mask.index(1):]))
        prompt, responses = preference.fit(pair[0][0], [pair[0][1], pair[1][1]], 9, 3)
        for side, response in zip(("chosen", "rejected"), responses):
            ids, mask = _unpadded(cut[f"{side}_ids"][i], cut[f"{side}_mask"][i], cut[f"{side}_len"][i])
            assert ids == prompt + response and sum(mask) == len(response) and len(ids) <= 9


def test_resume_multiprocess_and_validation(plain_dir, tmp_path):
    tokenizer, options = load_tokenizer(str(plain_dir)), preference.PreferenceConfig()
    path = _write_jsonl(tmp_path / "p.jsonl", PLAIN * 3)  # 12 lines: 9 train, 3 validation
    data = _data(path, batch_size=2, shuffle=True, num_epochs=None, validation_fraction=0.25)
    it = preference.train_iterator(data, options, tokenizer)
    for _ in range(3):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(4)]
    again = preference.train_iterator(data, options, tokenizer)
    again.set_state(state)
    for a, b in zip(after, [next(again) for _ in range(4)]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Every training row appears once per epoch (shuffled), never a validation row.
    seen = np.concatenate([b["index"] for b in [next(preference.train_iterator(
        _data(path, batch_size=9, shuffle=True, validation_fraction=0.25), options, tokenizer))]])
    assert sorted(seen) == list(range(9)) and list(seen) != list(range(9))
    # Two processes' rows together are the single-process batch.
    one = next(preference.train_iterator(data, options, tokenizer))
    parts = [next(preference.train_iterator(data, options, tokenizer, process_index=i, process_count=2))
             for i in range(2)]
    for key in one:
        np.testing.assert_array_equal(one[key], np.concatenate([p[key] for p in parts]))
    # Validation: the last 3 lines once, the last batch padded with index -1 rows (re-iterable).
    batches = list(preference.eval_dataset(data, options, tokenizer))
    assert [list(b["index"]) for b in batches] == [[0, 1], [2, -1]]
    assert not batches[-1]["chosen_mask"][1].any() and batches[-1]["chosen_len"][1] == 0
    assert len(list(preference.eval_dataset(data, options, tokenizer))) == 2


def test_margin_field(plain_dir, tmp_path):
    records = [{**r, "score": float(i) + 0.5} for i, r in enumerate(PLAIN)]
    path = _write_jsonl(tmp_path / "m.jsonl", records)
    rows = preference.splits(_data(path), preference.PreferenceConfig(margin_key="score"),
                             load_tokenizer(str(plain_dir)))[0]
    np.testing.assert_array_equal(rows["margin"], [0.5, 1.5, 2.5, 3.5])


BAD = [
    ('{"prompt": "a", "chosen": "b"}', 'missing key "rejected" (config key `preference.rejected_key`)'),
    ('{"prompt": "a", "chosen": " b", "rejected": " b"}', '"chosen" and "rejected" are identical'),
    ('{"prompt": "a", "chosen": "", "rejected": " b"}', '"chosen" is empty'),
    ('{"prompt": "a", "chosen": " b", "rejected": [{"role": "assistant", "content": ""}]}', '"rejected" is empty'),
    ('{"prompt": "a", "chosen": " b", "rejected": 3}', '"rejected" must be a string or a list'),
    ('{"prompt": "a", "chosen": " b", "rejected": " c"', "not valid JSON"),
    ('["a", "b"]', "a line must be a JSON object"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": " b", "rejected": " c"}', "must all be strings or all lists"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_bad_lines_name_file_line_and_key(line, message, plain_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PLAIN[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        preference.splits(_data(path), preference.PreferenceConfig(), load_tokenizer(str(plain_dir)))
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "a", "completion": " b"}', 'missing key "label" (config key `preference.label_key`)'),
    ('{"prompt": "a", "completion": " b", "label": "yes"}', '"label" must be true/false or 1/0'),
    ('{"prompt": "a", "completion": "", "label": 1}', '"completion" is empty'),
])
def test_bad_unpaired_lines(line, message, plain_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match="^" + str(path).replace(".", r"\.") + ":1: ") as e:
        preference.splits(_data(path), preference.PreferenceConfig(unpaired=True), load_tokenizer(str(plain_dir)))
    assert message in str(e.value)


def test_margin_must_be_a_number(plain_dir, tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{**PLAIN[0], "score": "high"}])
    with pytest.raises(ValueError, match=r':1: "score" must be a number \(config key `preference.margin_key`\)'):
        preference.splits(_data(path), preference.PreferenceConfig(margin_key="score"), load_tokenizer(str(plain_dir)))
