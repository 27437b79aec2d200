"""decontaminate: training documents with evaluation questions planted inside are dropped, exactly
those that a brute-force word-window search finds; bad evaluation files fail before the pipeline."""

import gzip
import json
import operator

import apache_beam as beam
import faker
import numpy as np
import pytest
import zstandard
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to

from data.prepare import decontaminate, minhash
from data.prepare.stage import Document

N = 13


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """Questions in JSONL (under "question"; 5 of them zstd-compressed), answers in gzipped text, one too short."""
    fake = faker.Faker()
    fake.seed_instance(1)
    root = tmp_path_factory.mktemp("eval")
    questions = [fake.sentence(nb_words=22, variable_nb_words=False).rstrip(".") + "?" for _ in range(20)]
    answers = [fake.sentence(nb_words=18, variable_nb_words=False) for _ in range(10)] + ["Too short to match."]
    with open(root / "questions.jsonl", "w") as f:
        f.writelines(json.dumps({"question": q, "id": 0}) + "\n" for q in questions[:15])
    lines = "".join(json.dumps({"question": q}) + "\n" for q in questions[15:])
    (root / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    with gzip.open(root / "answers.txt.gz", "wt") as f:
        f.write("\n".join(answers) + "\n\n")
    return root, questions + answers


def make_documents(examples):
    """Clean paragraphs, and paragraphs with a whole example, a 13-word window or only 12 words planted
    (re-cased, re-punctuated), and one with two windows of different examples."""
    fake = faker.Faker()
    fake.seed_instance(2)
    documents = []
    for i in range(60):
        words = fake.paragraph(nb_sentences=6).split()
        example = examples[i % (len(examples) - 1)].split()
        middle = len(words) // 2
        if i % 6 == 1:
            words[middle:middle] = [w.upper() + ";" for w in example]
        elif i % 6 == 2:
            words[middle:middle] = example[3:3 + N]
        elif i % 6 == 3:
            words[middle:middle] = example[3:3 + N - 1]
        elif i % 6 == 4:
            words[middle:middle] = example[:N] + ["and"] + examples[0].split()[-N:]
        documents.append(Document(f"train:{i:03d}", " ".join(words)))
    return documents


def shared_windows(text, examples, n):
    """Brute force: the distinct n-word windows of the examples that occur contiguously in the text."""
    words = minhash.words(text)
    shared = set()
    for example in examples:
        tokens = minhash.words(example)
        for i in range(len(tokens) - n + 1):
            window = tokens[i:i + n]
            if any(words[j:j + n] == window for j in range(len(words) - n + 1)):
                shared.add(tuple(window))
    return len(shared)


@pytest.fixture(scope="module")
def run(eval_dir):
    root, examples = eval_dir
    documents = make_documents(examples)
    pipeline = beam.Pipeline()
    created = pipeline | beam.Create(documents)
    expected = {}
    for min_shared in (1, 2):
        options = decontaminate.Options(eval_files=str(root / "*"), text_key="question", ngram=N,
                                        min_shared=min_shared)
        result = created | f"decontam{min_shared}" >> decontaminate.Decontaminate(options)
        contaminated = [d.id for d in documents if shared_windows(d.text, examples, N) >= min_shared]
        expected[min_shared] = contaminated
        assert_that(result.dropped, equal_to([(i, "decontam", "contaminated") for i in contaminated]),
                    label=f"dropped {min_shared}")
        assert_that(result.kept | f"ids {min_shared}" >> beam.Map(operator.attrgetter("id")),
                    equal_to([d.id for d in documents if d.id not in contaminated]), label=f"kept {min_shared}")
    outcome = pipeline.run()
    outcome.wait_until_finish()
    counters = {c.key.step.split("/")[0] + ":" + c.key.metric.name: c.committed
                for c in outcome.metrics().query(MetricsFilter().with_namespace("data.prepare.decontam"))["counters"]}
    return documents, expected, counters


def test_planted_questions_are_dropped_exactly_as_brute_force_finds(run):
    """(assert_that in the pipeline compared both outputs with the brute-force search.)"""
    documents, expected, _ = run
    planted_whole = {d.id for i, d in enumerate(documents) if i % 6 in (1, 2, 4)}
    assert set(expected[1]) == planted_whole  # whole examples and 13-word windows, not 12 words
    assert set(expected[2]) == {d.id for i, d in enumerate(documents) if i % 6 in (1, 4)}


def test_counters(run):
    documents, expected, counters = run
    assert counters["decontam1:documents"] == len(documents)
    assert counters["decontam1:dropped.contaminated"] == counters["decontam1:dropped"] == len(expected[1])
    assert counters["decontam1:kept"] == len(documents) - len(expected[1])
    assert counters["decontam1:eval_examples"] == 31 and counters["decontam1:eval_too_short"] == 1


def test_shared_ngrams_binary_search():
    evals = decontaminate.ngram_hashes("a b c d e f", 2)
    assert decontaminate.shared_ngrams(decontaminate.ngram_hashes("x a b y e f z", 2), evals) == 2
    assert decontaminate.shared_ngrams(decontaminate.ngram_hashes("f e d", 2), evals) == 0
    assert decontaminate.shared_ngrams(decontaminate.ngram_hashes("too short", 3), evals) == 0


def test_no_eval_files_keeps_everything():
    documents = [Document("a:0", "anything at all")]
    with beam.Pipeline() as pipeline:
        result = pipeline | beam.Create(documents) | decontaminate.Decontaminate()
        assert_that(result.kept, equal_to(documents))


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", '{"text": "no question key"}\n', "missing.jsonl:1: .* needs a string under 'question'"),
    ("broken.jsonl", '{"question": \n', "broken.jsonl:1: evaluation line is not valid JSON"),
    ("latin1.txt", b"caf\xe9\n", "latin1.txt:1: evaluation file line is not valid UTF-8"),
    ("table.csv", "a,b\n", "table.csv', which is neither .txt nor .jsonl"),
])
def test_bad_eval_files_fail_when_built(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        decontaminate.Decontaminate(decontaminate.Options(eval_files=str(path), text_key="question"))


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="--decontam_eval_files=.*matches no file"):
        decontaminate.Decontaminate(decontaminate.Options(eval_files=str(tmp_path / "*.jsonl")))
    with pytest.raises(ValueError, match="--decontam_ngram must be >= 1"):
        decontaminate.Options(ngram=0)


def test_union_of_eval_hashes_equals_numpy_unique():
    """The combiner (compacting every 1024 arrays, merged across accumulators) = np.unique of all."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 5000, size=rng.integers(0, 20), dtype=np.uint64) for _ in range(3000)]
    combine = decontaminate._UnionSorted()
    parts = []
    for chunk in (arrays[:1700], arrays[1700:]):
        accumulator = combine.create_accumulator()
        for a in chunk:
            accumulator = combine.add_input(accumulator, a)
        parts.append(accumulator)
    got = combine.extract_output(combine.merge_accumulators(parts))
    assert got.dtype == np.uint64 and got.tolist() == np.unique(np.concatenate(arrays)).tolist()
