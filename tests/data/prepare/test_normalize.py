"""normalize: NFC agrees with unicodedata on composed/decomposed pairs; control characters and
white space follow the documented rules; HTML text agrees with BeautifulSoup's (html.parser
backend) on varied documents; normalizing twice equals once; the four per-document stages
run in a Beam pipeline give what they give locally, counters included."""

import collections
import random
import re
import unicodedata
from pydoc_data.topics import topics

import bs4
import pytest

from data.prepare import normalize, stage
from data.prepare.normalize import Normalize

PAIRS = [  # (composed, decomposed)
    ("é", "e\u0301"),
    ("Å", "A\u030a"),
    ("ṩ", "s\u0323\u0307"),
    ("ṩ", "s\u0307\u0323"),  # combining marks in non-canonical order
    ("한국어", "\u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165"),
    ("Ω", "\u2126"),  # ohm sign -> Greek capital omega (a singleton decomposition)
    ("ﬁ", "ﬁ"),  # a compatibility ligature: NFC (unlike NFKC) leaves it
]


@pytest.mark.parametrize("composed, decomposed", PAIRS)
def test_nfc_matches_unicodedata(composed, decomposed):
    text = f"word {decomposed} word"
    outcome = Normalize()(text)
    assert outcome.text == unicodedata.normalize("NFC", text) == f"word {composed} word"
    assert dict(outcome.counts).get("nfc_changed", 0) == int(composed != decomposed)


def test_control_characters_removed_and_counted():
    rng = random.Random(0)
    pool = list("abc déf ") + ["\x00", "\x07", "\x1b", "\x7f", "\u200b", "\ufeff", "\u00ad", "\u2060",
                               "\u200d", "\u200f", "\t", "\n"]
    for _ in range(200):
        text = "x" + "".join(rng.choice(pool) for _ in range(40))
        outcome = Normalize()(text)
        removable = [c for c in text if (unicodedata.category(c) == "Cc" and c not in "\n\t")
                     or c in "\u200b\ufeff\u00ad\u2060"]
        assert dict(outcome.counts).get("control_removed", 0) == len(removable)
        assert not any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in outcome.text)
        # ZWJ and the right-to-left mark are kept (emoji sequences, bidirectional text).
        assert outcome.text.count("\u200d") == text.count("\u200d")
        assert outcome.text.count("\u200f") == text.count("\u200f")


def test_whitespace_rules():
    text = "\r\n\n  Title\t\t here  \r\n\r\n\r\n\r\n    indented   code  \rnext\u00a0\u00a0line \n\n\n"
    assert Normalize()(text).text == "  Title here\n\n    indented code\nnext line"
    flat = Normalize(Normalize.Options(keep_indent=False))(text).text
    assert flat == "Title here\n\nindented code\nnext line"
    for line in flat.split("\n"):
        assert line == line.rstrip() and "  " not in line
    assert "\n\n\n" not in flat


def test_empty_documents_are_dropped():
    for text in ("", "   ", "\u200b\ufeff \n\t\r\n", "<script>x()</script>"):
        outcome = Normalize(Normalize.Options(strip_html=True))(text)
        assert (outcome.text, outcome.reason) == (None, "empty"), repr(text)


def _html_documents():
    docs = [
        "<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style></head>"
        "<body><h1>Caf&eacute; &amp; bar</h1><p>First <b>bold</b> and <i>it</i>alic.</p>"
        "<!-- a comment --><div>one<br>two<br/>three</div><script>var x = '<p>';</script>"
        "<ul><li>alpha</li>\n  <li>beta &lt;tag&gt;</li></ul><noscript>enable js</noscript></body></html>",
        "<table><tr><td>a</td><td>b</td></tr><tr><th>&#x263A;</th><td>&#233;t&#233;</td></tr></table>"
        "<pre>  def f():\n      return 1</pre><p>after   the\n   pre</p>",
        "no markup at all, just text &amp; an entity",
        "<div><div><p>nested <span>inline <a href='#'>link</a></span> text</p></div></div>"
        "<blockquote>quoted</blockquote><p>unclosed paragraph<p>another<template>hidden</template>",
    ]
    rng = random.Random(1)
    paragraphs = [p for key in sorted(topics)[:20] for p in topics[key].split("\n\n") if p.strip()]
    inline, block = ["b", "i", "em", "a", "span", "code"], ["p", "div", "li", "h2", "td", "blockquote"]
    for _ in range(12):
        parts = []
        for paragraph in rng.sample(paragraphs, 6):
            words = paragraph.replace("<", "&lt;").replace(">", "&gt;").split(" ")
            i = rng.randrange(len(words))
            tag = rng.choice(inline)
            words[i] = f"<{tag}>{words[i]}</{tag}>"
            tag = rng.choice(block)
            parts.append(f"<{tag}>{' '.join(words)}</{tag}>")
        parts.insert(rng.randrange(len(parts)), "<script>if (a < b) { run(); }</script>")
        docs.append("<html><head><title>t</title></head><body>" + "\n".join(parts) + "</body></html>")
    return docs


def _soup_text(markup, mark_blocks):
    soup = bs4.BeautifulSoup(markup, "html.parser")
    for tag in soup.find_all(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    if mark_blocks:
        for string in soup.find_all(string=True):  # source line breaks are white space in HTML
            if type(string) is bs4.NavigableString and string.find_parent(["pre", "textarea"]) is None:
                string.replace_with(re.sub(r"\s+", " ", string))
        blocks = (normalize._PARAGRAPH_ELEMENTS | normalize._LINE_ELEMENTS) - {"body", "html", "title"}
        for tag in soup.find_all(sorted(blocks)):
            tag.insert_before("\n")
            tag.insert_after("\n")
    return soup.get_text()


@pytest.mark.parametrize("markup", _html_documents())
def test_html_text_matches_beautifulsoup(markup):
    text = Normalize(Normalize.Options(strip_html=True))(markup).text
    reference = _soup_text(markup, mark_blocks=False)
    # The same characters, whatever the white space ...
    assert re.sub(r"\s+", "", text) == re.sub(r"\s+", "", reference)
    # ... and the same lines, with blocks on lines of their own (pre keeps its own lines).
    if "<pre>" not in markup:
        ours = [" ".join(line.split()) for line in text.split("\n") if line.strip()]
        theirs = [" ".join(line.split()) for line in _soup_text(markup, True).split("\n") if line.strip()]
        assert ours == theirs


def test_html_counts_and_entities():
    outcome = Normalize(Normalize.Options(strip_html=True))("<p>caf&eacute; &lt;3</p>")
    assert outcome.text == "café <3"
    assert dict(outcome.counts)["html_stripped"] == 1
    assert "html_stripped" not in dict(Normalize()("<p>x</p>").counts)  # off by default


def test_normalizing_twice_equals_once():
    rng = random.Random(2)
    junk = "ab é\u0301\t  \r\n\n\n\x00\u200b\u00a0\u2028ﬁ한\u1100\u1161 "
    texts = [topics[k] for k in sorted(topics)] + _html_documents()
    texts += ["".join(rng.choice(junk) for _ in range(60)) for _ in range(300)]
    for options in (Normalize.Options(), Normalize.Options(keep_indent=False),
                    Normalize.Options(strip_html=True)):
        once_stage = Normalize(options)
        twice_stage = Normalize(Normalize.Options(keep_indent=options.keep_indent))
        for text in texts:
            once = once_stage(text).text
            if once is not None:
                assert twice_stage(once).text == once, repr(text)


def test_options_become_flags():
    import argparse

    parser = argparse.ArgumentParser()
    stage.add_arguments(parser, Normalize.name, Normalize.Options)
    args = parser.parse_args(["--normalize_strip_html=true"])
    assert stage.options_from(args, Normalize.name, Normalize.Options) == Normalize.Options(strip_html=True)


def test_the_four_stages_in_beam_equal_the_stages_run_locally():
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.util import assert_that, equal_to
    from faker import Faker

    from data.prepare import transforms
    from data.prepare.langid import LanguageId
    from data.prepare.pii import ScrubPii
    from data.prepare.quality import QualityFilter

    fake = Faker("de_DE")
    fake.seed_instance(0)
    texts = [topics[k] + f"\n\nWrite to a{i}@example.org or call +1-202-555-01{i:02d}."
             for i, k in enumerate(sorted(topics)[:30])]
    texts += ["<p>" + topics["pass"] + "</p><script>x()</script>", "", "\u200b\n\t",
              "Buy now!\nBuy now!", fake.paragraph(nb_sentences=30)]
    documents = [stage.Document(f"doc:{i:03d}", t) for i, t in enumerate(texts)]
    stages = [Normalize(Normalize.Options(strip_html=True)), LanguageId(), QualityFilter(), ScrubPii()]

    expected_kept, expected_dropped, expected_counts = [], [], {}
    for document in documents:
        text = document.text
        for s in stages:
            outcome = s(text)
            counts = expected_counts.setdefault(s.name, collections.Counter())
            stage.count_outcome(outcome, counts.update)
            if outcome.text is None:
                expected_dropped.append((document.id, s.name, outcome.reason))
                break
            text = outcome.text
        else:
            expected_kept.append(stage.Document(document.id, text))
    assert expected_kept and {d[1] for d in expected_dropped} == {"normalize", "langid", "quality"}

    pipeline = beam.Pipeline(runner="DirectRunner")
    collection = pipeline | beam.Create(documents)
    dropped = []
    for s in stages:
        outputs = collection | transforms.ApplyStage(s)
        collection = outputs.kept
        dropped.append(outputs[transforms.DROPPED])
    assert_that(collection, equal_to(expected_kept), label="kept")
    assert_that(dropped | beam.Flatten(), equal_to(expected_dropped), label="dropped")
    result = pipeline.run()
    result.wait_until_finish()
    for s in stages:
        query = result.metrics().query(MetricsFilter().with_namespace(f"{transforms.NAMESPACE}.{s.name}"))
        counters = {r.key.metric.name: r.committed for r in query["counters"]}
        assert counters == {k: v for k, v in expected_counts[s.name].items() if v}, s.name


def test_docstring_example():
    import doctest

    from data.prepare import normalize as module

    result = doctest.testmod(module)
    assert result.attempted and not result.failed
