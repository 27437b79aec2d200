"""evals.tasks / evals.sources / evals.corpus_tasks: task files become the prompts and requests
lm-eval builds from the same files (templates, choices, targets, description, few-shot sampler);
JSONL tasks by their fields; built-in tasks from the embedded corpus (its held-out topics),
data/verifiable.py and tfds (under mock_data); the built-in YAML installs; bad task files are
one-line errors naming the problem."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

from evals import corpus_tasks, sources, tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _mc_records(count):
    return [{"question": f"What is {i} plus {i % 3}?", "options": [f"{i + i % 3} apples", f"{i} pears", "many", "none"],
             "label": (i * 7) % 4, "answer": [str(i + i % 3), f"{i + i % 3}.0"], "id": i} for i in range(count)]


# Task files in lm-eval's format over local JSON Lines (dataset_path: json), each read by both.
LM_EVAL_TASKS = {
    "mc_fewshot": """
        task: mc_fewshot
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {test}, train: {train}}}}}
        test_split: test
        fewshot_split: train
        output_type: multiple_choice
        description: "Arithmetic.\\n\\n"
        doc_to_text: "Q: {{{{question}}}}\\nA:"
        doc_to_choice: "{{{{options}}}}"
        doc_to_target: label
        num_fewshot: 3
        """,
    "mc_same_split": """
        task: mc_same_split
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {test}}}}}
        test_split: test
        fewshot_split: test
        output_type: multiple_choice
        doc_to_text: question
        doc_to_choice: options
        doc_to_target: "{{{{options[label]}}}}"
        target_delimiter: " => "
        fewshot_delimiter: "\\n###\\n"
        num_fewshot: 2
        """,
    "gen": """
        task: gen
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {test}, train: {train}}}}}
        test_split: test
        training_split: train
        output_type: generate_until
        doc_to_text: "{{{{question}}}} Answer:"
        doc_to_target: answer
        generation_kwargs: {{until: ["\\n", "."], max_gen_toks: 7}}
        num_fewshot: 1
        """,
    "loglik": """
        task: loglik
        dataset_path: json
        dataset_kwargs: {{data_files: {{validation: {test}}}}}
        validation_split: validation
        output_type: loglikelihood
        doc_to_text: "{{{{question.split(' ')[:-1]|join(' ')}}}}"
        doc_to_target: "{{{{' ' + question.split(' ')[-1]}}}}"
        """,
}


@pytest.fixture(scope="module")
def lm_eval_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    test = _write_jsonl(root / "test.jsonl", _mc_records(9))
    train = _write_jsonl(root / "train.jsonl", _mc_records(14)[5:])
    for name, text in LM_EVAL_TASKS.items():
        (root / f"{name}.yaml").write_text(textwrap.dedent(text.format(test=test, train=train)))
    return root


@pytest.fixture(scope="module")
def lm_eval_instances(lm_eval_dir):
    """{task: [(doc_id, request arguments)]} as lm-eval builds them (fewshot seed 1234)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(lm_eval_dir), include_defaults=False)
    loaded = manager.load_task_or_group(list(LM_EVAL_TASKS))
    out = {}
    for name, task in loaded.items():
        task.set_fewshot_seed(1234)
        task.build_all_requests(rank=0, world_size=1)
        out[name] = sorted(((i.doc_id, i.idx, i.arguments) for i in task.instances), key=lambda x: x[:2])
    return out


@pytest.mark.parametrize("name", list(LM_EVAL_TASKS))
def test_requests_equal_lm_evals_from_the_same_task_file(name, lm_eval_dir, lm_eval_instances):
    task, = tasks.load_tasks([str(lm_eval_dir / f"{name}.yaml")])
    rng = task.fewshot_rng()
    ours = []
    for doc_id, doc in enumerate(task.docs):
        context = task.context(doc, rng)
        if task.output_type == "multiple_choice":
            ours += [(doc_id, i, (context, task.target_delimiter + c)) for i, c in enumerate(task.choices(doc))]
        elif task.output_type == "generate_until":
            ours.append((doc_id, 0, (context, dict(task.generation_kwargs))))
        else:
            ours.append((doc_id, 0, (context, task.target(doc))))
    theirs = lm_eval_instances[name]
    if task.output_type == "generate_until":  # lm-eval adds its own defaults (do_sample, temperature)
        theirs = [(d, i, (c, {k: v for k, v in kw.items() if k in task.generation_kwargs})) for d, i, (c, kw) in theirs]
        assert all(kw["until"] == ["\n", "."] and kw["max_gen_toks"] == 7 for *_, (_, kw) in theirs)
    assert ours == theirs
    if task.num_fewshot:  # the few-shot examples differ between documents: the sampler is exercised
        assert len({args[0].split("Q: ")[1] if "Q: " in args[0] else args[0][:40] for *_, args in ours}) > 2


def test_gold_and_references_follow_lm_evals_target_rules(lm_eval_dir):
    mc, same, gen = tasks.load_tasks([str(lm_eval_dir / f"{n}.yaml") for n in ("mc_fewshot", "mc_same_split", "gen")])
    for doc in mc.docs:
        assert mc.gold(doc) == doc["label"]  # a field holding an index
        assert same.gold(doc) == doc["options"].index(doc["options"][doc["label"]])  # a template giving a choice
        assert gen.references(doc) == doc["answer"]  # a list of references


def test_jsonl_tasks_by_their_fields(tmp_path):
    forms = {
        "mc.jsonl": ([{"query": "2+2=", "choices": ["4", "5"], "gold": 0}], "multiple_choice"),
        "qa.jsonl": ([{"prompt": "Capital of France?", "target": "Paris"}], "generate_until"),
        "refs.jsonl": ([{"prompt": "Say hi", "references": ["hi", "hello"]}], "generate_until"),
        "lambada.jsonl": ([{"context": "The cat sat on the", "continuation": " mat"}], "loglikelihood"),
        "wiki.jsonl": ([{"text": "A whole document.", "title": "extra fields are kept"}], "loglikelihood_rolling"),
    }
    paths = [_write_jsonl(tmp_path / name, records) for name, (records, _) in forms.items()]
    loaded = tasks.load_tasks(paths)
    assert [t.name for t in loaded] == ["mc", "qa", "refs", "lambada", "wiki"]
    assert [t.output_type for t in loaded] == [kind for _, kind in forms.values()]
    mc, qa, refs, lambada, wiki = loaded
    assert mc.gold(mc.docs[0]) == 0 and mc.choices(mc.docs[0]) == ["4", "5"]
    assert qa.references(qa.docs[0]) == ["Paris"] and refs.references(refs.docs[0]) == ["hi", "hello"]
    assert [m.name for m in qa.metrics] == ["exact_match", "f1"]
    assert lambada.context(lambada.docs[0], None) == "The cat sat on the" and lambada.target(lambada.docs[0]) == " mat"
    assert [m.name for m in wiki.metrics] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    shots, = tasks.load_tasks([paths[0]], num_fewshot=0)
    assert shots.num_fewshot == 0


def _error(names, match, **kwargs):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        tasks.load_tasks(names, **kwargs)
    message = str(e.value)
    assert "\n" not in message and re.search(match, message), message


def _yaml(tmp_path, text, name="t.yaml"):
    (tmp_path / name).write_text(textwrap.dedent(text))
    return str(tmp_path / name)


def test_bad_tasks_are_one_line_errors_naming_the_problem(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"q": "a?", "c": ["x", "y"], "g": 1}, {"q": "b?", "c": ["x"], "g": 1}])
    base = f"task: t\ndataset_path: files:{data}\ntest_split: test\noutput_type: multiple_choice\n"
    full = base + "doc_to_text: q\ndoc_to_choice: c\ndoc_to_target: g\n"
    _error(["no_such_task"], r"unknown task 'no_such_task'.*pydoc_continuation")
    _error([str(tmp_path / "missing.yaml")], r"missing.yaml does not exist")
    _error([_yaml(tmp_path, base + "doc_to_text: q\ndoc_to_target: g\n")], r"no 'doc_to_choice'.*multiple_choice")
    _error([_yaml(tmp_path, full.replace("task: t\n", ""))], r"has no 'task'")
    _error([_yaml(tmp_path, full.replace("test_split: test\n", ""))], r"no split to evaluate")
    _error([_yaml(tmp_path, full + "process_results: x\n")], r"key 'process_results' is not supported")
    _error([_yaml(tmp_path, full + "doc_to_decontamination_query: !function utils.q\n")], r"!function")
    _error([_yaml(tmp_path, full + "metric_list: [{metric: blue}]\n")], r"unknown metric 'blue'.*acc, acc_norm")
    _error([_yaml(tmp_path, full + "metric_list: [{metric: bleu}]\n")], r"'bleu' for multiple_choice.*generate_until")
    _error([_yaml(tmp_path, full + "metric_list: [acc, {metric: acc}]\n")], r"metric 'acc' is listed twice")
    _error([_yaml(tmp_path, full.replace("output_type: multiple_choice", "output_type: generate_until")
                  + "metric_list: [{metric: bertscore}]\n")], r"bertscore.*needs the option 'model_dir'")
    _error([_yaml(tmp_path, full.replace("output_type: multiple_choice", "output_type: classify"))],
           r"output_type 'classify'")
    _error([_yaml(tmp_path, full.replace("doc_to_text: q", "doc_to_text: '{{question}}'"))],
           r"doc_to_text '\{\{question\}\}' needs a field.*'question' is undefined.*fields are \['c', 'g', 'q'\]")
    _error([_yaml(tmp_path, full)], r"target 1 is neither an index into nor one of the 1 choices")
    _error([_yaml(tmp_path, full.replace(f"files:{data}", "hf:glue"))], r"unknown task data source 'hf:glue'")
    _error([_yaml(tmp_path, full.replace(data, str(tmp_path / "nope.jsonl")))], r"nope.jsonl does not exist")
    _error([_yaml(tmp_path, full.replace(f"files:{data}", "verifiable:divide"))], r"unknown verifiable task")
    _error([_write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}])], r"odd.jsonl:1 has the fields \['question'\]")
    _error([_write_jsonl(tmp_path / "gap.jsonl", [{"text": "a"}, {"body": "b"}])], r"record 2 lacks 'text'")
    _error(["pydoc_cloze", "pydoc_cloze"], r"two tasks are named 'pydoc_cloze'")
    _error(["pydoc_continuation"], r"num_fewshot=9999 but its few-shot split holds", num_fewshot=9999)
    _error(["pydoc_perplexity"], r"perplexity tasks take no few-shot examples", num_fewshot=1)


def test_relative_paths_are_relative_to_the_task_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "d_test.jsonl", [{"text": "x y"}])
    path = _yaml(tmp_path / "sub", "task: rel\ndataset_path: files:d_{split}.jsonl\ntest_split: test\n"
                                   "output_type: loglikelihood_rolling\ndoc_to_target: text\n")
    monkeypatch.chdir("/")
    task, = tasks.load_tasks([path])
    assert task.docs == [{"text": "x y"}]


def _normalized(text):
    return " ".join(text.split())


def test_corpus_tasks_come_from_the_held_out_topics_of_the_embedded_source(tmp_path):
    from data.sources import open_split

    held_out = open_split("embedded", "validation", data_dir=str(tmp_path))
    texts = {_normalized(held_out[i]) for i in range(len(held_out))}
    perplexity, continuation, cloze = tasks.load_tasks(["pydoc_perplexity", "pydoc_continuation", "pydoc_cloze"])
    assert {_normalized(d["text"]) for d in perplexity.docs} == texts  # the validation split, exactly
    by_topic = {d["topic"]: _normalized(d["text"]) for d in perplexity.docs}
    assert len(continuation.docs) >= 50 and len(cloze.docs) >= 20
    for doc in continuation.docs:
        choices = continuation.choices(doc)
        assert len(set(choices)) == corpus_tasks.CHOICES
        truth = _normalized(continuation.context(doc, None) + " " + choices[continuation.gold(doc)])
        assert truth in by_topic[doc["topic"]]  # the gold ending continues the text, word for word
        assert sum(_normalized(doc["query"] + " " + c) in by_topic[doc["topic"]] for c in choices) == 1
    for doc in cloze.docs:
        target = cloze.target(doc)
        assert re.fullmatch(r" [A-Za-z]{3,}", target)
        assert _normalized(cloze.context(doc, None) + target) in by_topic[doc["topic"]]
    golds = [continuation.gold(d) for d in continuation.docs]
    assert len(set(golds)) == corpus_tasks.CHOICES  # the true ending is not always in one place
    few = corpus_tasks.docs("continuation", "train")
    assert not {d["topic"] for d in few} & set(by_topic)  # few-shot examples from the other topics


def test_arithmetic_tasks_are_the_held_out_problems_of_data_verifiable():
    from data import verifiable

    addition, sorting = tasks.load_tasks(["arithmetic_addition", "arithmetic_sorting"], num_fewshot=2)
    _, held_out = verifiable.generate("addition", verifiable.TaskConfig())
    assert [d["prompt"] for d in addition.docs] == [p.prompt for p in held_out]
    assert [addition.references(d) for d in addition.docs] == [[p.answer] for p in held_out]
    train, _ = verifiable.generate("sorting", verifiable.TaskConfig())
    assert [d["prompt"] for d in sorting.fewshot_docs] == [p.prompt for p in train]
    context = sorting.context(sorting.docs[0], sorting.fewshot_rng())
    assert context.count("=") == 3 and context.endswith(sorting.docs[0]["prompt"])
    assert {m.name: dict(m.options) for m in sorting.metrics}["verified"] == {"task": "sorting"}


def test_tfds_tasks_under_mock_data(tmp_path):
    import tensorflow_datasets.text.glue  # noqa: F401  registers glue

    with tfds.testing.mock_data(num_examples=4):
        sst2, squad, cnn = tasks.load_tasks(["sst2", "squad", "cnn_dailymail"], data_dir=str(tmp_path))
        raw = {name: tfds.data_source(name, split=split, try_gcs=False)
               for name, split in (("glue/sst2", "validation"), ("squad", "validation"), ("cnn_dailymail", "test"))}
    assert len(sst2.docs) == len(squad.docs) == len(cnn.docs) == 4

    def text(value):
        return value.decode() if isinstance(value, bytes) else str(value)

    for i, doc in enumerate(sst2.docs):
        assert sst2.gold(doc) == int(raw["glue/sst2"][i]["label"])
        assert sst2.context(doc, None) == (text(raw["glue/sst2"][i]["sentence"])
                                           + "\nQuestion: Is this sentence positive or negative?\nAnswer:")
    for i, doc in enumerate(squad.docs):
        assert squad.references(doc) == [text(a) for a in raw["squad"][i]["answers"]["text"]]
        assert squad.context(doc, None).endswith(f"Question: {text(raw['squad'][i]['question'])}\n\nAnswer:")
    for i, doc in enumerate(cnn.docs):
        assert cnn.references(doc) == [text(raw["cnn_dailymail"][i]["highlights"])]
    assert squad.generation_kwargs == {"until": ["\n"], "max_gen_toks": 32}
    assert cnn.generation_kwargs["until"] == ["\n\n"]  # lm-eval's default: the few-shot delimiter


def test_built_in_task_files_install_with_the_package(tmp_path):
    """setup.py's package_data: a build of the package holds every built-in task file, and
    evals.tasks run from that copy lists and loads them."""
    build = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", f"--build-lib={build}"], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    shipped = sorted(os.listdir(build / "evals" / "task_data"))
    assert shipped == sorted(f for f in os.listdir(os.path.join(REPO, "evals", "task_data")) if f.endswith(".yaml"))
    code = (f"import evals.tasks as t; assert t.__file__.startswith({str(build)!r}), t.__file__; "
            "print(','.join(t.builtin_names())); print(t.load_tasks(['pydoc_cloze'])[0].name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(build)}, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [",".join(tasks.builtin_names()), "pydoc_cloze"]
    for name in tasks.builtin_names():  # each file names itself
        assert tasks._read_yaml(os.path.join(tasks.TASK_DATA, f"{name}.yaml"))["task"] == name


def test_sources_name_their_forms():
    with pytest.raises(ValueError, match=r"has the splits test, train, not 'validation'"):
        sources.read_docs("embedded:cloze", "validation")
    with pytest.raises(ValueError, match=r"dataset_kwargs key 'digitz' is not a verifiable task setting"):
        sources.read_docs("verifiable:addition", "test", kwargs={"digitz": 3})
    docs = sources.read_docs("verifiable:addition", "test", kwargs={"digits": 1, "num_eval": 5})
    assert len(docs) == 5 and all(len(d["prompt"]) == 4 for d in docs)  # "a+b="
