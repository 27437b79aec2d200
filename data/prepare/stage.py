"""What a per-document stage is: a named, configured function of one document's text.

A stage returns an `Outcome`: the (possibly rewritten) text, or None and the reason it dropped
the document, plus counts of what it did (e.g. PII replacements). Stages are pure and
picklable (Beam ships them to workers), hold their thresholds in a frozen `Options` dataclass,
and are usable without Beam (`run_local`). `data.prepare.transforms.ApplyStage` runs one in a
pipeline and turns its outcomes into Beam counters:

    namespace `data.prepare.<stage name>`: `kept`, `dropped`, `dropped.<reason>`, and each
    count the stage reports under its own name.

Options become command-line flags `--<stage name>_<field>` (`add_arguments`), with the
field's type from its default and its help from the field's `metadata["help"]`, so the
thresholds are documented once, where they are used.
"""

import argparse
import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, NamedTuple


class Document(NamedTuple):
    """One document in flight: a stable id (`<file>:<record>`, unique, sorts deterministically)."""

    id: str
    text: str


class Outcome(NamedTuple):
    """What a stage did to one document.

    text: the document's text after the stage; None drops the document.
    reason: why it was dropped (a short counter name such as 'too_few_words'); "" when kept.
    counts: extra counters, (name, amount) pairs, e.g. (('email', 2),).
    """

    text: str | None
    reason: str = ""
    counts: tuple[tuple[str, int], ...] = ()


def keep(text: str, **counts: int) -> Outcome:
    """The document stays, as `text`; nonzero `counts` are reported."""
    return Outcome(text, "", tuple((k, v) for k, v in counts.items() if v))


def drop(reason: str, **counts: int) -> Outcome:
    """The document is dropped for `reason`."""
    return Outcome(None, reason, tuple((k, v) for k, v in counts.items() if v))


def field(default: Any, help: str) -> Any:
    """A stage option with its documentation (shown by `--help`)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class DocumentStage:
    """Base of per-document stages: subclasses set `name`, define `Options` and `__call__`."""

    name: ClassVar[str] = ""
    options: Any = None

    def __call__(self, text: str) -> Outcome:
        raise NotImplementedError


def add_arguments(parser: argparse.ArgumentParser, name: str, options_type: type) -> None:
    """Adds `--<name>_<field>` for every field of the `options_type` dataclass."""
    group = parser.add_argument_group(name)
    for f in dataclasses.fields(options_type):
        flag = f"--{name}_{f.name}"
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if isinstance(f.default, bool):
            group.add_argument(flag, type=_parse_bool, default=f.default, help=help_text)
        elif isinstance(f.default, tuple):
            group.add_argument(flag, type=_parse_tuple, default=f.default, help=help_text + "; comma-separated")
        else:
            group.add_argument(flag, type=type(f.default), default=f.default, help=help_text)


def options_from(args: Mapping[str, Any] | argparse.Namespace, name: str, options_type: type) -> Any:
    """The `options_type` built from parsed `--<name>_<field>` flags (missing ones keep defaults)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    kwargs = {f.name: values[f"{name}_{f.name}"] for f in dataclasses.fields(options_type)
              if f"{name}_{f.name}" in values}
    return options_type(**kwargs)


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean; use true or false")


def _parse_tuple(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def run_local(stage: DocumentStage, texts: Iterable[str]) -> tuple[list[Outcome], collections.Counter]:
    """Runs a stage over texts without Beam: the outcomes and the counters Beam would report."""
    outcomes, counters = [], collections.Counter()
    for text in texts:
        outcome = stage(text)
        outcomes.append(outcome)
        count_outcome(outcome, counters.update)
    return outcomes, counters


def count_outcome(outcome: Outcome, add) -> None:
    """Reports an outcome's counters through `add({name: amount})` (one place for their names)."""
    if outcome.text is None:
        add({"dropped": 1, f"dropped.{outcome.reason}": 1})
    else:
        add({"kept": 1})
    add(dict(outcome.counts))
