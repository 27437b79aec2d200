"""The training file from the annotators' judgments (annotate/merge.py): the policy on crafted
votes (majority, unanimity, ties, skips, too few votes), checked item by item against a direct
count; the written files pass the trainer's own readers (`data.preference.check_lines`,
`data.tasks.check`) and a reward model trains two steps on a merged file with `train.trainer.run`;
the command writes once and refuses to overwrite or to write among the annotator files.
"""

import collections
import json
import os

import numpy as np
import pytest

from annotate import merge, store
from configs.loader import load_config
from data import preference
from data import tasks as data_tasks
from tests.cli_output import REPO, assert_one_line_error, run_module

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
         "checkpoint.async_save=false"]


def _pair_rows(name, votes):
    """`store` judgment rows of annotator `name`: votes {item: a | b | tie | skip}."""
    rows = []
    for item, choice in votes.items():
        a, b = f" response one of {item}", f" response two of {item}"
        fields = ({"prompt": f"Prompt {item}:", "chosen": a if choice == "a" else b, "rejected": b if choice == "a" else a}
                  if choice in "ab" else {"prompt": f"Prompt {item}:", "a": a, "b": b})
        rows.append({**fields, "id": item, "annotator": name, "choice": choice})
    return rows


def _write_dir(directory, rows_by_name):
    directory.mkdir(exist_ok=True)
    for name, rows in rows_by_name.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(directory)


VOTES = {
    "alice": {"1": "a", "2": "b", "3": "tie", "4": "a", "5": "skip", "6": "b", "7": "a"},
    "bob": {"1": "a", "2": "a", "3": "tie", "4": "a", "5": "skip", "6": "b"},
    "carol": {"1": "a", "2": "b", "3": "a", "4": "b", "5": "a", "6": "skip"},
}


def _expected(votes, policy, min_votes):
    """Item -> kept choice, by a direct count (skips are no votes; ties are not kept)."""
    by_item = collections.defaultdict(list)
    for choices in votes.values():
        for item, choice in choices.items():
            if choice != "skip":
                by_item[item].append(choice)
    kept = {}
    for item, cast in by_item.items():
        top, count = collections.Counter(cast).most_common(1)[0]
        needed = len(cast) if policy == "unanimous" else len(cast) // 2 + 1
        if len(cast) >= min_votes and count >= needed and top != "tie":
            kept[item] = top
    return kept


@pytest.mark.parametrize("policy, min_votes", [("majority", 1), ("majority", 2), ("majority", 3), ("unanimous", 1),
                                               ("unanimous", 2)])
def test_policy_keeps_exactly_the_items_a_direct_count_keeps(tmp_path, policy, min_votes):
    directory = _write_dir(tmp_path / "votes", {n: _pair_rows(n, v) for n, v in VOTES.items()})
    merged = merge.merge(store.read_directory(directory), policy=policy, min_votes=min_votes)
    want = _expected(VOTES, policy, min_votes)
    assert {line["id"]: line["chosen"] == f" response one of {line['id']}" for line in merged.lines} == {
        item: choice == "a" for item, choice in want.items()}
    for line in merged.lines:
        cast = [v[line["id"]] for v in VOTES.values() if v.get(line["id"], "skip") != "skip"]
        assert (line["votes"], line["agree"]) == (len(cast), cast.count(want[line["id"]]))
    # every item is kept or counted under one reason
    assert len(merged.lines) + merged.no_votes + merged.too_few_votes + merged.no_majority + merged.tie == 7
    assert merged.no_votes == 0 and merged.items == 7


def test_merged_pairs_pass_the_preference_reader_and_train_a_reward_model(tmp_path):
    from data.tokenizer.training import train_tokenizer
    from train import trainer

    rng = np.random.default_rng(0)
    names = {"alice": {}, "bob": {}}
    for i in range(40):
        for votes in names.values():
            votes[f"p{i}"] = str(rng.choice(["a", "b", "tie", "skip"], p=[0.5, 0.3, 0.1, 0.1]))
    directory = _write_dir(tmp_path / "votes", {n: _pair_rows(n, v) for n, v in names.items()})
    out = str(tmp_path / "pairs.jsonl")
    merged = merge.merge(store.read_directory(directory))
    merge.write(merged, out)
    assert len(merged.lines) == len(_expected(names, "majority", 1)) >= 8
    assert preference.check_lines([out], preference.PreferenceConfig()) == len(merged.lines)
    texts = [line["prompt"] + line["chosen"] + line["rejected"] for line in merged.lines]
    train_tokenizer(texts, 300, ("<|endoftext|>",), trainer="lmlab", directory=str(tmp_path / "tokenizer"))
    config = load_config(os.path.join(REPO, "configs/llama.py:tiny"), [
        "objective=reward", f"data.source=files:{out}", f"tokenizer.path={tmp_path / 'tokenizer'}", "data.seq_len=32",
        "data.batch_size=8", "data.validation_fraction=0.25", "model.max_len=32", "eval.max_batches=0", "steps=2",
        "schedule.warmup_steps=1", "checkpoint.save_interval_steps=2", *QUIET])
    summary = trainer.run(config, str(tmp_path / "run"))
    print(f"\nreward model on {len(merged.lines)} merged pairs: {summary}")
    assert np.isfinite(summary["train_loss"]) and 0.0 <= summary["val_accuracy"] <= 1.0


def _label_rows(name, votes):
    return [{"text": f"Item {item} text", "text_pair": f"context {item}", **({} if c == "skip" else {"label": c}),
             "id": item, "annotator": name, "choice": c} for item, c in votes.items()]


def test_merged_labels_pass_the_task_reader(tmp_path):
    votes = {"alice": {str(i): ["neg", "pos", "neu"][i % 3] for i in range(12)},
             "bob": {str(i): ["neg", "pos", "neu"][i % 3] if i % 4 else "skip" for i in range(12)}}
    directory = _write_dir(tmp_path / "votes", {n: _label_rows(n, v) for n, v in votes.items()})
    merged = merge.merge(store.read_directory(directory), min_votes=2)
    assert [line["id"] for line in merged.lines] == [str(i) for i in range(12) if i % 4]
    assert merged.too_few_votes == 3
    out = str(tmp_path / "labels.jsonl")
    merge.write(merged, out)
    config = data_tasks.TaskConfig(source=f"files:{out}", text_pair_key="text_pair", validation_fraction=0.25)
    data_tasks.check(config)
    records = data_tasks.read_records(config, "train")[0] + data_tasks.read_records(config, "validation")[0]
    assert sorted(r.fields["label"] for r in records) == sorted(line["label"] for line in merged.lines)


def test_merge_command_writes_once_and_refuses_bad_output(tmp_path):
    directory = _write_dir(tmp_path / "votes", {n: _pair_rows(n, v) for n, v in VOTES.items()})
    out = tmp_path / "train.jsonl"
    result = run_module("annotate.merge", directory, f"--out={out}", "--policy=unanimous")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# 4 of 7 items kept, 3 no majority; wrote")
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["1", "5", "6", "7"]
    assert_one_line_error(run_module("annotate.merge", directory, f"--out={out}"), "exists; pass --overwrite")
    assert_one_line_error(run_module("annotate.merge", directory, f"--out={directory}/merged.jsonl"),
                          "would count as an annotator's file")
    assert_one_line_error(run_module("annotate.merge", directory, f"--out={out}", "--overwrite", "--min_votes=4"),
                          "no item passed the policy (0 of 7 items kept, 7 too few votes)")
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["1", "5", "6", "7"]  # untouched


def test_files_judged_on_different_task_files_are_refused(tmp_path):
    alice, bob = _pair_rows("alice", {"1": "a", "2": "tie"}), _pair_rows("bob", {"1": "b", "2": "skip"})
    merge.merge(store.read_directory(_write_dir(tmp_path / "same", {"alice": alice, "bob": bob})))
    bob[1]["b"] = " a response alice never saw"
    with pytest.raises(ValueError, match=r"bob.jsonl:2: item '2' differs from the item of that id at .*alice.jsonl:2"):
        store.read_directory(_write_dir(tmp_path / "different", {"alice": alice, "bob": bob}))
