"""data.prompts: rows and host tables of task and JSONL prompts, the prompt rendering an SFT'd
model saw, resume == uninterrupted, processes' rows partition the batch, one-line errors."""

import json

import numpy as np
import pytest

from configs import base
from data import chat, prompts, sft, verifiable
from data.pipeline import DataConfig
from data.tokenizer import ByteLevelBPE

BYTES = ByteLevelBPE([bytes([b]) for b in range(256)], [], ("<|endoftext|>",))
EOS = BYTES.eos_id
TASKS = verifiable.TaskConfig(num_train=40, num_eval=10)


def _options(**overrides):
    return prompts.PromptConfig(**{"max_prompt_len": 16, "tasks": TASKS, **overrides})


def _data(source, **overrides):
    return DataConfig(**{"source": source, "batch_size": 4, "seed": 3, "validation_fraction": 0.25, **overrides})


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_task_rows_match_the_host_table():
    data, options = _data("task:addition"), _options()
    train, held_out = prompts.splits(data, options, BYTES)
    assert len(train.examples) == 40 and len(held_out.examples) == 10
    batch = next(prompts.train_iterator(data, options, BYTES))
    assert batch["prompt_ids"].shape == (4, 16) and batch["prompt_ids"].dtype == np.int32
    assert batch["prompt_len"].dtype == np.int32 and batch["index"].dtype == np.int32
    for ids, length, index in zip(batch["prompt_ids"], batch["prompt_len"], batch["index"], strict=True):
        example = train.examples[index]
        # [eos as bos] + the prompt's bytes, as data.sft renders a plain prompt-completion line
        assert ids[:length].tolist() == [EOS, *example["prompt"].encode()]
        assert not ids[length:].any()
        assert int(example["answer"]) == sum(map(int, example["prompt"][:-1].split("+")))
        assert example["task"] == "addition" and example["solution"] == example["answer"]


def test_plain_prompt_is_the_prefix_sft_trains_on():
    ids, mask = sft.encode_record(BYTES, {"prompt": "12+34=", "completion": "46"})
    prompt_ids = prompts.encode_prompt(BYTES, "12+34=")
    assert ids[:len(prompt_ids)] == prompt_ids and not any(mask[:len(prompt_ids)]) and mask[len(prompt_ids)]


def test_chat_prompt_is_the_generation_prompt_of_the_template():
    text = "What is 2+2?"
    expected, _ = chat.render(BYTES, [{"role": "user", "content": text}], add_generation_prompt=True,
                              template="chatml")
    assert prompts.encode_prompt(BYTES, text, "chatml") == expected
    assert bytes(expected).decode().endswith("<|im_start|>assistant\n")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert prompts.encode_prompt(BYTES, messages) == chat.render(BYTES, messages, True, "chatml")[0]


def test_resume_equals_uninterrupted_and_epochs_reshuffle():
    data, options = _data("task:addition"), _options()
    whole = [b["index"].tolist() for _, b in zip(range(25), prompts.train_iterator(data, options, BYTES))]
    epoch = [i for b in whole[:10] for i in b]
    assert sorted(epoch) == list(range(40)) and whole[:10] != whole[10:20]  # each epoch once, shuffled anew
    it = prompts.train_iterator(data, options, BYTES)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = prompts.train_iterator(data, options, BYTES)
    resumed.set_state(state)
    assert [next(resumed)["index"].tolist() for _ in range(18)] == whole[7:]


def test_processes_rows_partition_the_global_batch():
    data, options = _data("task:sorting", batch_size=4), _options(max_prompt_len=24)
    whole = next(prompts.train_iterator(data, options, BYTES, process_index=0, process_count=1))
    parts = [next(prompts.train_iterator(data, options, BYTES, process_index=p, process_count=2)) for p in range(2)]
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)


def test_eval_rows_cover_the_held_out_split_once():
    data, options = _data("task:addition"), _options()
    batches = prompts.eval_batches(data, options, BYTES)
    index = np.concatenate([b["index"] for b in batches])
    assert len(batches) == 3 and index[:10].tolist() == list(range(10)) and (index[10:] == -1).all()
    filler = batches[-1]
    _, held_out = prompts.splits(data, options, BYTES)
    for row, length in zip(filler["prompt_ids"][2:], filler["prompt_len"][2:], strict=True):
        assert row[:length].tolist() == list(held_out.ids[0])  # padding rows generate a real prompt
    assert len(list(prompts.eval_dataset(data, options, BYTES))) == 3  # re-iterable


def test_jsonl_prompts_fields_and_split(tmp_path):
    records = [{"prompt": f"q{i}", "answer": i, "difficulty": "easy"} for i in range(7)]
    records.append({"messages": [{"role": "user", "content": "hi"}], "answer": "x"})
    path = _write(tmp_path / "p.jsonl", records[:4] + [""] + records[4:])
    train, held_out = prompts.splits(_data(f"files:{path}"), _options(max_prompt_len=64), BYTES)
    assert [e["prompt"] for e in train.examples] == [f"q{i}" for i in range(6)]
    assert train.examples[2] == {"prompt": "q2", "answer": "2", "difficulty": "easy", "task": ""}
    assert held_out.examples[1]["prompt"] == [{"role": "user", "content": "hi"}]
    assert list(held_out.ids[1]) == chat.render(BYTES, records[-1]["messages"], True, "chatml")[0]


def _config(source, **rl):
    c = base.get_config()
    c.objective = "grpo"
    c.init_from = "run:/somewhere"
    c.data.source = source
    c.data.seq_len = 32
    c.rl.update(max_new_tokens=8, **rl)
    return c


@pytest.mark.parametrize(("lines", "fragment"), [
    (['{"prompt": "a", "answer": "1"}', "{not json"], ":2: not valid JSON"),
    (['{"prompt": "a", "answer": "1"}', '{"question": "b", "answer": "2"}'], ":2: the line has no prompt"),
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'], ':2: the line has no "answer"'),
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "", "answer": "1"}'], ":2: the line has no prompt"),
    (['{"prompt": [{"content": "x"}], "answer": "1"}'], ":1: \"prompt\" must be a string or"),
    ([], "holds no prompt"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, lines, fragment):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match="^" + str(path).replace(".", r"\.")) as e:
        prompts.check_source(_config(f"files:{path}"), str(tmp_path))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_answers_are_optional_without_the_accuracy_reward(tmp_path):
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "a"}', '{"prompt": "b"}'])
    prompts.check_source(_config(f"files:{path}", rewards="format"), str(tmp_path))


@pytest.mark.parametrize(("change", "fragment"), [
    ({"source": "embedded"}, "the RL objectives read 'task:NAME'"),
    ({"source": "task:subtraction"}, "unknown verifiable task 'subtraction'"),
    ({"source": "files:/nowhere/p.jsonl"}, "data file /nowhere/p.jsonl does not exist"),
    ({"max_new_tokens": 32}, "`rl.max_new_tokens`=32"),
    ({"init_from": ""}, "set config key `init_from`"),
    ({"digits": 0}, "`verifiable.digits`=0"),
])
def test_bad_config_fails_in_one_line(tmp_path, change, fragment):
    c = _config("task:addition")
    for key, value in change.items():
        section = {"source": c.data, "max_new_tokens": c.rl, "digits": c.verifiable}.get(key, c)
        section[key] = value
    with pytest.raises(ValueError) as e:
        prompts.check_source(c, str(tmp_path))
        prompts.task_config(c)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_prompts_longer_than_the_budget_fail_naming_the_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "short", "answer": "1"}', '{"prompt": "' + "x" * 30 + '", '
                                         '"answer": "1"}', '{"prompt": "s", "answer": "1"}'])
    with pytest.raises(ValueError, match=f"{path}:2: the prompt has 31 tokens, more than the 16"):
        prompts.splits(_data(f"files:{path}"), _options(), BYTES)
