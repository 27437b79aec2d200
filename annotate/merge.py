"""The training file from the annotators' judgments: `python -m annotate.merge DIR --out=FILE`.

    python -m annotate.merge labels/ --out=pairs.jsonl                       # majority of the votes
    python -m annotate.merge labels/ --out=pairs.jsonl --policy=unanimous --min_votes=2
    python -m train --config=configs/llama.py:tiny --config.objective=reward \\
        --config.data.source=files:pairs.jsonl ...

Policy, per item: its votes are the annotators' choices other than skip. The item is kept
when it has at least `min_votes` votes and one choice holds a strict majority of them
(`majority`: more than half; `unanimous`: all), and, for a preference pair, that choice is
a or b (a pair the annotators call a tie teaches no preference). With two annotators both
policies keep exactly the items they agree on; with one, every item it judged.

Written lines, items in the order the annotator files list them (by name, then judgment order):
  * pairs: `{"prompt", "chosen", "rejected", "id", "votes", "agree"}`: the lines
    `data.preference` reads (objective=reward, dpo), with the item's id, its vote count and
    how many votes the kept choice had as extra keys (which it ignores);
  * labels: `{"text"[, "text_pair"], "label", "id", "votes", "agree"}`: the lines
    `data.tasks` reads as classification examples (objective=classification; with pairs,
    task.text_pair_key=text_pair).
The file is written whole to a temporary name and renamed, never left half written.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from annotate import store
from annotate.tasks import LABEL, SKIP

POLICIES = ("majority", "unanimous")
TRAINING_KEYS = ("prompt", "chosen", "rejected", "text", "text_pair", "label")


@dataclasses.dataclass(frozen=True)
class Merged:
    """The kept lines and why the other items were left out (counts of items)."""

    kind: str
    lines: list[dict]
    items: int
    no_votes: int  # every annotator skipped it
    too_few_votes: int
    no_majority: int
    tie: int  # pairs whose majority said tie


def merge(judgments: dict[str, list[dict]], *, policy: str = "majority", min_votes: int = 1) -> Merged:
    """The training lines of `judgments` ({annotator: rows}, `store.read_files`) under `policy`.

    Raises:
      ValueError: an unknown policy, min_votes < 1, or no judgment at all.
    """
    if policy not in POLICIES:
        raise ValueError(f"--policy={policy!r}; expected one of {POLICIES}")
    if min_votes < 1:
        raise ValueError(f"--min_votes={min_votes} must be >= 1")
    kind = store.kind_of(judgments)
    if kind is None:
        raise ValueError(f"the annotator files {sorted(judgments)} hold no judgment yet; label some items first")
    by_item: dict[str, list[dict]] = collections.defaultdict(list)
    for rows in judgments.values():
        for row in rows:
            by_item[row["id"]].append(row)
    lines, left_out = [], collections.Counter()
    for item_id, rows in by_item.items():
        voted = [row for row in rows if row["choice"] != SKIP]
        counts = collections.Counter(row["choice"] for row in voted)
        if not voted:
            left_out["no_votes"] += 1
            continue
        if len(voted) < min_votes:
            left_out["too_few_votes"] += 1
            continue
        (top, agree), = counts.most_common(1)
        if agree * 2 <= len(voted) or (policy == "unanimous" and agree < len(voted)):
            left_out["no_majority"] += 1
            continue
        if kind != LABEL and top == "tie":
            left_out["tie"] += 1
            continue
        example = next(row for row in voted if row["choice"] == top)
        fields = {k: example[k] for k in TRAINING_KEYS if k in example}
        lines.append({**fields, "id": item_id, "votes": len(voted), "agree": agree})
    return Merged(kind, lines, len(by_item), left_out["no_votes"], left_out["too_few_votes"],
                  left_out["no_majority"], left_out["tie"])


def write(merged: Merged, path: str, *, overwrite: bool = False) -> None:
    """Writes `merged.lines` to `path` (a temporary file renamed into place).

    Raises:
      ValueError: nothing to write, or `path` exists and not `overwrite`.
    """
    if not merged.lines:
        raise ValueError(f"no item passed the policy ({summary(merged)}); judge more items or relax "
                         "--policy / --min_votes")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"--out={path} exists; pass --overwrite to replace it")
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in merged.lines)
    os.replace(temporary, path)


def summary(merged: Merged) -> str:
    parts = [f"{len(merged.lines)} of {merged.items} items kept"]
    for name in ("no_votes", "too_few_votes", "no_majority", "tie"):
        if getattr(merged, name):
            parts.append(f"{getattr(merged, name)} {name.replace('_', ' ')}")
    return ", ".join(parts)


def main(argv):
    from absl import app, flags

    if len(argv) != 2:
        raise app.UsageError("give the annotators' directory: python -m annotate.merge DIR --out=FILE")
    directory, out = argv[1], flags.FLAGS.out
    if os.path.abspath(os.path.dirname(out)) == os.path.abspath(directory) and out.endswith(".jsonl"):
        raise ValueError(f"--out={out} is inside {directory}, where it would count as an annotator's file; write it "
                         "elsewhere")
    merged = merge(store.read_directory(directory), policy=flags.FLAGS.policy, min_votes=flags.FLAGS.min_votes)
    write(merged, out, overwrite=flags.FLAGS.overwrite)
    objective = "classification" if merged.kind == LABEL else "reward (or dpo)"
    print(f"# {summary(merged)}; wrote {out}: train with objective={objective}, data.source=files:{out}")


if __name__ == "__main__":
    from absl import flags

    from train import cli

    flags.DEFINE_string("out", None, "The training JSONL to write.")
    flags.DEFINE_enum("policy", "majority", list(POLICIES), "Which items are kept (see the module docstring).")
    flags.DEFINE_integer("min_votes", 1, "Keep only items with at least this many votes (skips do not count).")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
    flags.mark_flag_as_required("out")
    cli.run(main)  # errors as one line `error: ...`
