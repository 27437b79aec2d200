"""rag.questions: definition questions from the pydoc topics with their answer paragraphs, and
rag.evaluate's recall table on a few topics (IVF scanning every cell equals exact; recall rises with k;
MiniLM finds the answer paragraph far above chance)."""

import pytest

from rag.chunk import Chunk
from rag.evaluate import KS, format_table, recall_table
from rag.questions import answers, definition_question, make_questions


@pytest.mark.parametrize(("sentence", "question"), [
    ("Private names are transformed to a longer form before code is generated for them.",
     "What are Private names?"),
    ("A code block is executed in an execution frame.", "What is a code block?"),
    ("If the primary is a mapping object, the subscript must be hashable.", None),
    ("It is an error to do this.", None),
    ("The following methods are defined for all objects.", None),
    ("Short is.", None),
])
def test_definition_questions(sentence, question):
    assert definition_question(sentence) == question


def test_question_set_points_at_its_paragraphs():
    from pydoc_data.topics import topics

    questions = make_questions()
    assert len(questions) > 150 and len({q.text for q in questions}) == len(questions)
    assert len({q.doc_id for q in questions}) > 30
    for q in questions:
        paragraph = " ".join(line.strip() for line in topics[q.doc_id][q.char_start:q.char_end].splitlines())
        assert q.sentence in paragraph and q.text.startswith("What ") and q.text.endswith("?")
    q = questions[0]
    inside = Chunk("", q.doc_id, "s", 0, 1, q.char_end - 1, q.char_end + 5)
    assert answers(q, inside)
    assert not answers(q, Chunk("", q.doc_id, "s", 0, 1, q.char_end, q.char_end + 5))
    assert not answers(q, Chunk("", q.doc_id + "x", "s", 0, 1, q.char_start, q.char_end))


def test_recall_table_quick(embedder):
    rows, info = recall_table(embedder, quick=True)
    exact, *ivfs = rows
    full = next(r for r in ivfs if r["nprobe"] == info["nlist"])
    for k in KS:
        assert full[f"recall@{k}"] == exact[f"recall@{k}"] and full[f"vs_exact@{k}"] == 1.0
    assert exact["recall@1"] <= exact["recall@5"] <= exact["recall@10"]
    assert exact["recall@5"] > 0.5  # chance: about 5 x (1-2 answer chunks) / 44 chunks
    assert "| exact | - |" in format_table(rows, info)
