"""evals.metrics.text_tokenizers splits text into the same tokens as sacrebleu 2.6.0's tokenizers."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_char import TokenizerChar
from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International
from sacrebleu.tokenizers.tokenizer_none import NoneTokenizer
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

from evals.metrics.text_tokenizers import TOKENIZERS, get_tokenizer

SACREBLEU = {"13a": Tokenizer13a(), "intl": TokenizerV14International(), "zh": TokenizerZh(),
             "char": TokenizerChar(), "none": NoneTokenizer()}

# Characters at the edges of each rule: ASCII punctuation (13a), digits next to . , - (numbers),
# Unicode punctuation and symbols (intl), the zh ranges' ends (U+2000/U+2001, U+2A6D/U+2A6E, and
# CJK Extension B, which sacrebleu's zh misses), full-width forms, accents and odd whitespace.
_EDGE_CHARS = list("aZ09 .,-'\"&;<>()[]{}!?/\\$%@#*+=_~`^|\n\t\r\x0c\x1c") + [
    "&amp;", "&quot;", "&lt;", "&gt;", "<skipped>", "-\n", "北", "京", "㐀", "é", "É", "ß", "…", "—", "“", "”",
    "，", "。", "、", "Ｈ", "１", "€", "¿", "«", "²", "½", "\u2000", "\u2001", "\u2a6d", "\u2a6e", "\u2f80",
    "\u2f81", "\u2fa1", "\u2fa2", "𠀀", "\u3000", "\u00a0", "\u2028", "٣", "ﾃ", "☃", "✂", "ｶ",
]


@settings(max_examples=400, deadline=None)
@given(text=st.lists(st.sampled_from(_EDGE_CHARS), max_size=30).map("".join))
@example(text="a.,5 b..c 1,000.50 3-4 x-\ny &amp;lt; &amp;quot; <skipped> end.")
@example(text="北京欢迎你！Café naïve 3.14 €5 “quoted” — ok… 𠀀 ext-B")
def test_tokenizers_equal_sacrebleu_on_edge_characters(text):
    for name, tokenizer in TOKENIZERS.items():
        assert tokenizer(text) == SACREBLEU[name](text).split(), name


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_tokenizers_equal_sacrebleu_on_any_text(text):
    for name, tokenizer in TOKENIZERS.items():
        assert tokenizer(text) == SACREBLEU[name](text).split(), name


def test_tokenizers_split_what_their_rules_say():
    assert get_tokenizer("13a")("It costs $1,000.50, ok.") == ["It", "costs", "$", "1,000.50", ",", "ok", "."]
    assert get_tokenizer("intl")("Prix: 1.000,50€!") == ["Prix", ":", "1.000,50", "€", "!"]
    assert get_tokenizer("zh")("北京abc，好") == ["北", "京", "abc", "，", "好"]
    assert get_tokenizer("char")("a b\tc") == ["a", "b", "c"]
    assert get_tokenizer("none")(" a,b  c ") == ["a,b", "c"]


def test_an_unknown_tokenizer_is_one_line_naming_it_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown tokenize 'ja-mecab'; use one of 13a, intl, zh, char, none"):
        get_tokenizer("ja-mecab")
