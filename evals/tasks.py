"""Evaluation tasks declared as data: a YAML subset of lm-eval's task format, or a plain JSONL file.

    tasks = load_tasks(["pydoc_continuation", "my_task.yaml", "qa.jsonl"])

A name is a built-in task (`evals/task_data/NAME.yaml`, `builtin_names()`) or a path to a task
file. A YAML task uses lm-eval's keys (`KEYS`), so a task file written for lm-eval on local data
runs here unchanged:

    task: my_mc
    dataset_path: files:my_mc.jsonl      # see evals.sources: files:, json, tfds:, embedded:, verifiable:
    test_split: test                     # the evaluated split (else validation_split)
    output_type: multiple_choice         # | generate_until | loglikelihood | loglikelihood_rolling
    doc_to_text: "Question: {{question}}\\nAnswer:"   # a field name or a jinja2 template
    doc_to_choice: choices               # a field, a template rendering a list, or a YAML list
    doc_to_target: label                 # an index into the choices, a choice, or (generation) the reference(s)
    target_delimiter: " "                # between the context and a choice or few-shot answer
    fewshot_delimiter: "\\n\\n"            # after each few-shot example
    num_fewshot: 0                       # examples from fewshot_split (else training_split,
                                         # validation_split, the evaluated split)
    generation_kwargs: {until: ["\\n"], max_gen_toks: 32}
    metric_list: [{metric: acc}, {metric: acc_norm}]   # options beside `metric` go to the metric

Prompts are built as lm-eval builds them: description + (text + target_delimiter + answer +
fewshot_delimiter) per few-shot example + text; a choice is scored as the continuation
target_delimiter + choice; few-shot examples are drawn by one `random.Random(FEWSHOT_SEED)` over
the documents in order (lm-eval's sampler and seed), the evaluated document left out when the
few-shot split is the test split (lm-eval's rule: `fewshot_split` equal to `test_split`, both
possibly unset; a JSONL task draws from its own documents and leaves the evaluated one out).

Not supported (a one-line error names the key): lm-eval's Python hooks (`!function`,
process_docs, process_results, filter_list), `include`, groups, several contexts per document.
Where lmlab differs on purpose: a generation task with several references scores each metric
by its own multi-reference rule (BLEU's and chrF's statistics, ROUGE's and SQuAD's best
reference) where lm-eval counts any matching reference as 1.

A JSONL task (name = the file's stem) holds records of one standard form (`JSONL_FORMS`):
{"query", "choices", "gold"} (multiple choice), {"prompt", "target" | "references"}
(generation, scored by SQuAD exact match and F1), {"context", "continuation"} (loglikelihood),
{"text"} (rolling perplexity).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from evals import sources
from evals.metrics import registry

TASK_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "task_data")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
KEYS = ("task", "dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split",
        "training_split", "fewshot_split", "output_type", "doc_to_text", "doc_to_choice", "doc_to_target",
        "target_delimiter", "fewshot_delimiter", "description", "generation_kwargs", "metric_list", "num_fewshot")
IGNORED_KEYS = ("tag", "metadata", "task_alias", "should_decontaminate", "doc_to_decontamination_query")  # descriptive
NEEDS = {  # output_type -> the doc_to_* keys it needs
    "multiple_choice": ("doc_to_text", "doc_to_choice", "doc_to_target"),
    "generate_until": ("doc_to_text", "doc_to_target"),
    "loglikelihood": ("doc_to_text", "doc_to_target"),
    "loglikelihood_rolling": ("doc_to_target",),
}
JSONL_FORMS = {  # record keys -> (output_type, doc_to_text, doc_to_choice, doc_to_target)
    ("query", "choices", "gold"): ("multiple_choice", "query", "choices", "gold"),
    ("prompt", "target"): ("generate_until", "prompt", None, "target"),
    ("prompt", "references"): ("generate_until", "prompt", None, "references"),
    ("context", "continuation"): ("loglikelihood", "context", None, "continuation"),
    ("text",): ("loglikelihood_rolling", None, None, "text"),
}
GENERATION_KEYS = ("until", "max_gen_toks", "temperature", "do_sample")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """A metric of a task: its registry name and the options its metric_list entry gave."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One evaluation task: its documents and how they become requests and scores.

    Attributes:
      name: the task's name (results are keyed by it).
      output_type: multiple_choice | generate_until | loglikelihood | loglikelihood_rolling.
      docs: the evaluated split's documents, in order.
      fewshot_docs: where few-shot examples are drawn from.
      doc_to_text, doc_to_choice, doc_to_target: field names, jinja2 templates or lists.
      metrics: what scores it.
      fewshot_excludes_doc: whether a document is kept out of its own few-shot examples (lm-eval:
        when the few-shot split is the test split).
      where: the file that declared it (for error messages).
    """

    name: str
    output_type: str
    docs: Sequence[dict]
    fewshot_docs: Sequence[dict] = ()
    doc_to_text: Any = None
    doc_to_choice: Any = None
    doc_to_target: Any = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    generation_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metrics: tuple[MetricSpec, ...] = ()
    num_fewshot: int = 0
    fewshot_excludes_doc: bool = True
    where: str = ""

    # --- A document's parts (lm-eval's doc_to_text / doc_to_choice / doc_to_target).

    def text(self, doc: Mapping) -> str:
        """The document's prompt text (without few-shot examples)."""
        text = _resolve(self.doc_to_text, doc, self, "doc_to_text")
        if not isinstance(text, str):
            raise ValueError(f"task {self.name!r}: doc_to_text gives a {type(text).__name__} ({text!r}), not text; "
                             "lm-eval's several-contexts form (an index) is not supported here")
        return text

    def choices(self, doc: Mapping) -> list[str]:
        """The document's answer choices."""
        choices = self.doc_to_choice
        if isinstance(choices, Mapping):
            choices = list(choices.values())
        elif isinstance(choices, str):
            choices = doc[choices] if choices in doc else _literal(_render(choices, doc, self, "doc_to_choice"))
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices) or not choices:
            raise ValueError(f"task {self.name!r}: doc_to_choice gives {choices!r}, not a list of strings; fix it "
                             f"or the data ({_doc_where(doc)})")
        return list(choices)

    def target(self, doc: Mapping) -> Any:
        """doc_to_target as lm-eval reads it: a field's value as it is; a template's text, an
        integer when it is digits and the task has choices, a list when it reads as one."""
        target = self.doc_to_target
        if isinstance(target, (int, list)):
            return target
        if target in doc:
            return doc[target]
        text = _render(target, doc, self, "doc_to_target")
        if text.isdigit() and self.doc_to_choice is not None:
            return int(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def gold(self, doc: Mapping) -> int | list[int]:
        """Multiple choice: the index (or indices) of the right choice(s)."""
        choices, target = self.choices(doc), self.target(doc)
        golds = target if isinstance(target, list) else [target]
        indices = []
        for gold in golds:
            if isinstance(gold, str) and gold in choices:
                gold = choices.index(gold)
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise ValueError(f"task {self.name!r}: the target {gold!r} is neither an index into nor one of the "
                                 f"{len(choices)} choices {choices}; fix the data ({_doc_where(doc)}) or doc_to_target")
            indices.append(gold)
        return indices if isinstance(target, list) else indices[0]

    def references(self, doc: Mapping) -> list[str]:
        """Generation: the reference text(s) of the document."""
        target = self.target(doc)
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        if self.doc_to_choice is not None:  # lm-eval: an index names the choice that is the reference
            choices = self.choices(doc)
            targets = [choices[t] if isinstance(t, int) and 0 <= t < len(choices) else t for t in targets]
        targets = [str(t) for t in targets]
        if not targets:
            raise ValueError(f"task {self.name!r}: a document has no reference ({_doc_where(doc)}); fix the data")
        return targets

    def answer(self, doc: Mapping) -> str:
        """The answer a few-shot example shows (lm-eval: the choice, the first of several targets)."""
        target = self.target(doc)
        if self.doc_to_choice is not None and isinstance(target, int):
            return self.choices(doc)[target]
        if isinstance(target, list):
            return str(target[0]) if target else ""
        return str(target)

    # --- Prompts.

    def context(self, doc: Mapping, rng: random.Random | None) -> str:
        """The prompt of `doc`: description, `num_fewshot` examples drawn with `rng`, its text.

        Args:
          doc: one of `docs`.
          rng: the task's few-shot generator, drawn from once per document in order (lm-eval's
            sampler); unused without few-shot examples.
        """
        parts = [str(_resolve(self.description, doc, self, "description")) if self.description else ""]
        for example in self.fewshot_examples(doc, rng):
            answer = self.answer(example)
            # lm-eval's build_qa_turn: an empty answer adds neither delimiter
            parts += [self.text(example), self.target_delimiter, answer, self.fewshot_delimiter] if answer else [
                self.text(example)]
        return "".join(parts) + self.text(doc)

    def fewshot_examples(self, doc: Mapping, rng: random.Random | None) -> list[Mapping]:
        """lm-eval's default sampler: when the document is to be kept out, n + 1 are drawn and it
        is left out of them."""
        n = self.num_fewshot
        if n == 0:
            return []
        pool = list(self.fewshot_docs)
        if self.fewshot_excludes_doc:
            drawn = [d for d in rng.sample(pool, n + 1) if d != doc][:n]
            if len(drawn) < n:  # duplicates of doc were drawn: lm-eval draws again without them
                drawn = rng.sample([d for d in pool if d != doc], n)
            return drawn
        return rng.sample(pool, n)

    def fewshot_rng(self) -> random.Random:
        return random.Random(FEWSHOT_SEED)


# --- Templates.

@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


@functools.lru_cache(maxsize=256)
def _template(source: str):
    return _environment().from_string(source)


def _render(template: str, doc: Mapping, task: Task, key: str) -> str:
    import jinja2

    try:
        return _template(template).render(**doc)
    except jinja2.UndefinedError as e:
        raise ValueError(f"task {task.name!r}: {key} {template!r} needs a field the document lacks ({e.message}); "
                         f"its fields are {sorted(doc)} ({_doc_where(doc)})") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"task {task.name!r}: {key} {template!r} is not a valid jinja2 template ({e}); fix it "
                         f"in {task.where}") from None


def _resolve(spec: Any, doc: Mapping, task: Task, key: str) -> Any:
    """lm-eval's doc_to_text: a field's value when `spec` names one, else the rendered template."""
    if isinstance(spec, int):
        return spec
    if spec in doc:
        return doc[spec]
    return _render(spec, doc, task, key)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def _doc_where(doc: Mapping) -> str:
    keys = sorted(doc)[:6]
    return "a document with the fields " + ", ".join(keys) + (", ..." if len(doc) > 6 else "")


# --- Loading.

def builtin_names() -> list[str]:
    """The built-in tasks (evals/task_data/*.yaml)."""
    return sorted(f[:-5] for f in os.listdir(TASK_DATA) if f.endswith(".yaml"))


def load_tasks(names: Sequence[str], *, data_dir: str | None = None, num_fewshot: int | None = None) -> list[Task]:
    """The tasks `names` name, their documents read and checked.

    Args:
      names: built-in task names or paths to .yaml / .jsonl task files.
      data_dir: where `tfds:` sources are prepared (tfds's default when None).
      num_fewshot: overrides every task's num_fewshot.

    Raises:
      ValueError / FileNotFoundError: one line naming an unknown task, a task file with a
        missing or unknown field, an unknown metric, or a document its templates do not fit.
    """
    tasks = [_load_one(name, data_dir, num_fewshot) for name in names]
    seen = set()
    for task in tasks:
        if task.name in seen:
            raise ValueError(f"two tasks are named {task.name!r}; give each task a different name (its `task` key or "
                             "file name)")
        seen.add(task.name)
    return tasks


def _load_one(name: str, data_dir: str | None, num_fewshot: int | None) -> Task:
    if name.endswith((".yaml", ".yml", ".jsonl")):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"task file {name} does not exist; fix the path")
        task = _jsonl_task(name, num_fewshot) if name.endswith(".jsonl") else _yaml_task(name, data_dir, num_fewshot)
    elif name in builtin_names():
        task = _yaml_task(os.path.join(TASK_DATA, f"{name}.yaml"), data_dir, num_fewshot)
    else:
        raise ValueError(f"unknown task {name!r}; built-in tasks are {', '.join(builtin_names())}, or give the path "
                         "of a .yaml or .jsonl task file")
    check(task)
    return task


def _jsonl_task(path: str, num_fewshot: int | None) -> Task:
    docs = sources.read_docs("files:" + os.path.abspath(path), "test")
    keys = set(docs[0])
    form = next((f for f in JSONL_FORMS if set(f) <= keys), None)
    if form is None:
        raise ValueError(f"{path}:1 has the fields {sorted(keys)}, none of the task forms "
                         f"{[list(f) for f in JSONL_FORMS]}; fix the file, or describe it in a .yaml task file")
    for number, doc in enumerate(docs, 1):
        missing = [k for k in form if k not in doc]
        if missing:
            raise ValueError(f"{path}: record {number} lacks {missing[0]!r}, which a {list(form)} task needs in "
                             "every record; fix the record")
    output_type, text, choice, target = JSONL_FORMS[form]
    metrics = ("exact_match", "f1") if output_type == "generate_until" else registry.DEFAULTS[output_type]
    return Task(name=os.path.splitext(os.path.basename(path))[0], output_type=output_type, docs=docs,
                doc_to_text=text, doc_to_choice=choice, doc_to_target=target,
                metrics=tuple(MetricSpec(m) for m in metrics), where=path, num_fewshot=num_fewshot or 0,
                fewshot_docs=docs if num_fewshot else (),
                generation_kwargs={"until": ["\n\n"]} if output_type == "generate_until" else {})


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        raise ValueError(f"{path}: {e.problem} (line {e.problem_mark.line + 1}); lm-eval's `!function` hooks "
                         "run Python and are not supported: express the field as a template") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a YAML mapping of task keys; see evals/tasks.py for the format")
    unknown = sorted(set(config) - set(KEYS) - set(IGNORED_KEYS))
    if unknown:
        raise ValueError(f"{path}: key {unknown[0]!r} is not supported by lmlab's task format; the keys are "
                         f"{', '.join(KEYS)}")
    return config


def _yaml_task(path: str, data_dir: str | None, num_fewshot: int | None) -> Task:
    config = _read_yaml(path)
    for key in ("task", "dataset_path", "output_type"):
        if not config.get(key):
            raise ValueError(f"{path} has no {key!r}; a task file needs task, dataset_path, output_type and the "
                             "doc_to_* keys of its output type")
    output_type = config["output_type"]
    if output_type not in NEEDS:
        raise ValueError(f"{path}: output_type {output_type!r} is not one of {', '.join(NEEDS)}")
    for key in NEEDS[output_type]:
        if config.get(key) is None:
            raise ValueError(f"{path} has no {key!r}, which a {output_type} task needs; add it")
    split = config.get("test_split") or config.get("validation_split")
    if not split:
        raise ValueError(f"{path} names no split to evaluate; set test_split (or validation_split)")
    base = os.path.dirname(os.path.abspath(path))
    read = functools.partial(sources.read_docs, str(config["dataset_path"]), name=config.get("dataset_name"),
                             kwargs=config.get("dataset_kwargs"), base_dir=base, data_dir=data_dir)
    docs = read(split)
    num_fewshot = int(config.get("num_fewshot") or 0) if num_fewshot is None else num_fewshot
    fewshot_split = (config.get("fewshot_split") or config.get("training_split") or config.get("validation_split")
                     or split)
    fewshot_docs = (docs if fewshot_split == split else read(fewshot_split)) if num_fewshot else ()
    return Task(
        name=str(config["task"]), output_type=output_type, docs=docs, fewshot_docs=fewshot_docs,
        doc_to_text=config.get("doc_to_text"), doc_to_choice=config.get("doc_to_choice"),
        doc_to_target=config.get("doc_to_target"), target_delimiter=str(config.get("target_delimiter", " ")),
        fewshot_delimiter=str(config.get("fewshot_delimiter", "\n\n")), description=str(config.get("description", "")),
        generation_kwargs=_generation_kwargs(config, path), metrics=_metric_specs(config, path),
        num_fewshot=num_fewshot, fewshot_excludes_doc=config.get("fewshot_split") == config.get("test_split"),
        where=path)


def _generation_kwargs(config: Mapping, path: str) -> dict:
    kwargs = dict(config.get("generation_kwargs") or {})
    if kwargs and config["output_type"] != "generate_until":
        raise ValueError(f"{path}: generation_kwargs apply to generate_until tasks, not {config['output_type']}")
    unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
    if unknown:
        raise ValueError(f"{path}: generation_kwargs key {unknown[0]!r} is not supported; the keys are "
                         f"{', '.join(GENERATION_KEYS)}")
    if config["output_type"] == "generate_until":
        until = kwargs.get("until", [config.get("fewshot_delimiter", "\n\n")])  # lm-eval's default
        kwargs["until"] = [until] if isinstance(until, str) else list(until)
    return kwargs


def _metric_specs(config: Mapping, path: str) -> tuple[MetricSpec, ...]:
    entries = config.get("metric_list")
    if entries is None:
        return tuple(MetricSpec(m) for m in registry.DEFAULTS[config["output_type"]])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: metric_list must be a list of {{metric: NAME, ...}} entries")
    specs = []
    for entry in entries:
        entry = {"metric": entry} if isinstance(entry, str) else dict(entry)
        if "metric" not in entry:
            raise ValueError(f"{path}: a metric_list entry {entry} has no 'metric' key")
        name = entry.pop("metric")
        for key in ("aggregation", "higher_is_better"):  # lm-eval's; ours are fixed per metric
            entry.pop(key, None)
        try:
            registry.get(name, config["output_type"], entry)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if name in [s.name for s in specs]:
            raise ValueError(f"{path}: metric {name!r} is listed twice in metric_list (results are keyed by "
                             "metric name); keep one entry")
        specs.append(MetricSpec(name, entry))
    return tuple(specs)


def check(task: Task) -> None:
    """Renders every document's prompt parts, so that data that do not fit the task's templates
    fail here, before any model work; ValueError naming the task and the document otherwise."""
    if not task.docs:
        raise ValueError(f"task {task.name!r} has no documents in its evaluated split ({task.where}); give it data")
    if task.num_fewshot < 0 or task.num_fewshot and len(task.fewshot_docs) <= task.num_fewshot:
        raise ValueError(f"task {task.name!r}: num_fewshot={task.num_fewshot} but its few-shot split holds "
                         f"{len(task.fewshot_docs)} documents; lower num_fewshot or give it more")
    if task.output_type == "loglikelihood_rolling" and task.num_fewshot:
        raise ValueError(f"task {task.name!r}: perplexity tasks take no few-shot examples; set num_fewshot: 0")
    for spec in task.metrics:
        registry.get(spec.name, task.output_type, spec.options)
    for doc in task.docs:
        if task.output_type == "loglikelihood_rolling":
            _check_text(task, task.target(doc), "doc_to_target", doc)
            continue
        task.text(doc)
        if task.output_type == "multiple_choice":
            task.gold(doc)
        elif task.output_type == "generate_until":
            task.references(doc)
        else:
            _check_text(task, task.target(doc), "doc_to_target", doc)
    for doc in task.fewshot_docs[:1]:
        task.text(doc)
        task.answer(doc)


def _check_text(task: Task, value: Any, key: str, doc: Mapping) -> None:
    if not isinstance(value, str):
        raise ValueError(f"task {task.name!r}: {key} gives a {type(value).__name__}, not text ({_doc_where(doc)})")
