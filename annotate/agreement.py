"""How much the annotators agree: `python -m annotate.agreement DIR` (or FILE FILE ...).

    python -m annotate.agreement labels/                 # every NAME.jsonl under labels/
    python -m annotate.agreement labels/alice.jsonl labels/bob.jsonl --json

For each pair of annotators, Cohen's kappa (`annotate.kappa`) on the items both judged, a
skipped item counting as not judged. The categories are the choices: a, b and tie for
preference pairs (a tie is a judgment too), the labels for class labels. With three or more
annotators, also Fleiss' kappa on the items every one of them judged. Each kappa comes with its
observed and expected agreement and its item count; a kappa is undefined (null) when both
annotators put every shared item into one same category.
"""

from __future__ import annotations

import itertools
import json
import os

from annotate import kappa, store
from annotate.tasks import SKIP


def votes(judgments: dict[str, list[dict]]) -> dict[str, dict[str, str]]:
    """{annotator: {item id: choice}} without skips."""
    return {name: {row["id"]: row["choice"] for row in rows if row["choice"] != SKIP}
            for name, rows in judgments.items()}


def shared_items(choices: dict[str, dict[str, str]], names) -> list[str]:
    """The ids every one of `names` judged, sorted."""
    return sorted(set.intersection(*(set(choices[name]) for name in names)))


def report(judgments: dict[str, list[dict]]) -> dict:
    """{kind, annotators, pairs: [{annotators, kappa, observed, expected, items, categories}],
    fleiss: the same for all annotators (None with fewer than 3, or no item all judged)}.

    Raises:
      ValueError: fewer than two annotators.
    """
    if len(judgments) < 2:
        raise ValueError(f"agreement needs the files of two or more annotators; found {sorted(judgments)}")
    choices = votes(judgments)
    pairs = []
    for first, second in itertools.combinations(choices, 2):
        ids = shared_items(choices, (first, second))
        entry = {"annotators": [first, second], "kappa": None, "observed": None, "expected": None, "items": 0,
                 "categories": []}
        if ids:
            entry.update(kappa.cohen_kappa([choices[first][i] for i in ids],
                                           [choices[second][i] for i in ids]).as_dict())
        pairs.append(entry)
    fleiss = None
    ids = shared_items(choices, choices)
    if len(choices) >= 3 and ids:
        fleiss = {"annotators": list(choices),
                  **kappa.fleiss_kappa([[choices[name][i] for name in choices] for i in ids]).as_dict()}
    return {"kind": store.kind_of(judgments), "annotators": list(choices), "pairs": pairs, "fleiss": fleiss}


def _line(title: str, entry: dict, shared: str) -> str:
    if not entry["items"]:
        return f"{title}: no item {shared}"
    value = "undefined (one same category for every item)" if entry["kappa"] is None else f"{entry['kappa']:.3f}"
    return (f"{title}: kappa {value} (observed {entry['observed']:.3f}, expected {entry['expected']:.3f}) on "
            f"{entry['items']} items {shared}")


def render(result: dict) -> str:
    """The report as lines of text."""
    lines = [_line(f"{a} vs {b}", entry, "both judged") for entry in result["pairs"]
             for a, b in [entry["annotators"]]]
    if result["fleiss"] is not None:
        lines.append(_line(f"Fleiss ({', '.join(result['annotators'])})", result["fleiss"], "all judged"))
    return "\n".join(lines)


def main(argv):
    from absl import app, flags

    args = argv[1:]
    if not args:
        raise app.UsageError("give the annotators' directory (python -m annotate.agreement DIR) or their files")
    if len(args) == 1 and os.path.isdir(args[0]):
        judgments = store.read_directory(args[0])
    elif len(args) == 1:
        raise ValueError(f"{args[0]} is not a directory; give the annotators' directory, or two or more files")
    else:
        judgments = store.read_files(args)
    result = report(judgments)
    print(json.dumps(result, indent=1) if flags.FLAGS.json else render(result))


if __name__ == "__main__":
    from absl import flags

    from train import cli

    flags.DEFINE_bool("json", False, "Print the report as JSON.")
    cli.run(main)  # errors as one line `error: ...`
