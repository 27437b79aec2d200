"""Text normalization: Unicode NFC, control characters, whitespace, optional HTML stripping.

The first stage every document goes through, so that later stages (hashing for exact dedup,
shingles for MinHash, the quality rules' word and line counts) see one spelling of the same
text. In order:

1. HTML to text (only with `--normalize_strip_html=true`), with the stdlib `html.parser`:
   the contents of script, style, noscript, template and head are dropped, comments too;
   block elements (p, div, li, h1-h6, tr, table, blockquote, pre, ...) start and end a line
   (paragraph-like ones a blank line, so paragraphs stay paragraphs for the quality rules),
   `<br>` is a line break; whitespace inside text collapses as a browser shows it (except in
   pre / textarea); entities are unescaped (`&amp;` -> `&`, `&#233;` -> `é`).
2. Line breaks unified: `\\r\\n`, `\\r` and the other Unicode line boundaries (`\\v`, `\\f`,
   U+0085, U+2028, U+2029, ...) become `\\n`.
3. Control characters removed (before NFC, so that a character removed from between a letter
   and its combining accent cannot leave an uncomposed pair behind): every `Cc` except `\\n`
   and `\\t`, and the invisible format characters that carry no meaning in running text:
   zero-width space U+200B, word joiner U+2060, byte-order mark / zero-width no-break space
   U+FEFF, soft hyphen U+00AD. Other `Cf` characters are kept: ZWJ / ZWNJ (U+200C/D) are part
   of emoji sequences and of Persian and Indic spelling, and the bidirectional marks order
   right-to-left text.
4. Unicode NFC (canonical composition: `e` + U+0301 -> `é`), so that the same word has one
   code-point sequence whatever the source's encoder did. NFC, not NFKC: compatibility folding
   (ligatures, full-width forms, superscripts) changes meaning in code and mathematics.
5. Whitespace: runs of spaces, tabs and other horizontal white space (NBSP, ...) inside a line
   become one space; leading indentation is kept as it is (`--normalize_keep_indent=true`, the
   default, so code and verse keep their shape) or removed (false); trailing white space is
   stripped from every line; three or more line breaks become two (one blank line); the text
   is stripped of blank lines at both ends.

A document that is empty afterwards is dropped ("empty"). Counts: `nfc_changed` (documents
that NFC changed), `control_removed` (characters removed in step 3), `html_stripped`
(documents whose markup was removed).

    >>> from data.prepare.normalize import Normalize
    >>> Normalize(Normalize.Options())("Cafe\\u0301\\u200b  au   lait \\r\\n\\r\\n\\r\\n\\tbon ")
    Outcome(text='Café au lait\\n\\n\\tbon', reason='', counts=(('nfc_changed', 1), ('control_removed', 1)))

Normalizing twice gives the same text as normalizing once (tested).
"""

import dataclasses
import html.parser
import re
import unicodedata

from data.prepare import stage

__all__ = ["Normalize", "NormalizeOptions", "html_to_text", "normalize_whitespace"]

# Dropped with everything inside them: not text a reader sees.
_INVISIBLE_ELEMENTS = frozenset({"script", "style", "noscript", "template", "head"})
# Start and end a paragraph (a blank line around them).
_PARAGRAPH_ELEMENTS = frozenset({
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "dl",
    "section", "article", "header", "footer", "aside", "nav", "main", "figure", "form",
    "fieldset", "address", "hr", "details",
})
# Start and end a line.
_LINE_ELEMENTS = frozenset({
    "div", "li", "dt", "dd", "tr", "td", "th", "caption", "figcaption", "thead", "tbody",
    "tfoot", "summary", "option", "textarea", "body", "html", "br",
})
_VOID_ELEMENTS = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
    "track", "wbr",
})
_PREFORMATTED = frozenset({"pre", "textarea"})

_LINE_BOUNDARIES = re.compile("\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_INVISIBLE_FORMAT = frozenset("\u200b\u2060\ufeff\u00ad")
_HORIZONTAL_RUN = re.compile(r"[^\S\n]+")
_LEADING_SPACE = re.compile(r"^[^\S\n]*")
_MANY_NEWLINES = re.compile(r"\n{3,}")


@dataclasses.dataclass(frozen=True)
class NormalizeOptions:
    strip_html: bool = stage.field(False, "treat documents as HTML and keep only their visible text")
    keep_indent: bool = stage.field(True, "keep each line's leading indentation (code, verse); "
                                          "false removes it")


class _TextExtractor(html.parser.HTMLParser):
    """Collects the visible text of an HTML document as pieces and line-break markers."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self._invisible_depth = 0
        self._preformatted_depth = 0

    def handle_starttag(self, tag, attrs):
        self._boundary(tag)
        if tag in _VOID_ELEMENTS:
            return
        if tag in _INVISIBLE_ELEMENTS:
            self._invisible_depth += 1
        if tag in _PREFORMATTED:
            self._preformatted_depth += 1

    def handle_startendtag(self, tag, attrs):
        self._boundary(tag)

    def handle_endtag(self, tag):
        if tag in _INVISIBLE_ELEMENTS and self._invisible_depth:
            self._invisible_depth -= 1
        if tag in _PREFORMATTED and self._preformatted_depth:
            self._preformatted_depth -= 1
        self._boundary(tag)

    def handle_data(self, data):
        if self._invisible_depth:
            return
        if not self._preformatted_depth:
            data = re.sub(r"\s+", " ", data)
            if self._at_line_start():
                data = data.lstrip(" ")  # as a browser shows it: no indent from the source
        if data:
            self.pieces.append(data)

    def _boundary(self, tag):
        if self._invisible_depth:
            return
        if tag in _PARAGRAPH_ELEMENTS:
            self._break("\n\n")
        elif tag in _LINE_ELEMENTS:
            self._break("\n")

    def _break(self, newlines):
        # Adjacent boundaries (</li><li>, </p> <p>) make one break, the larger, not their sum;
        # white space between them is source formatting, not text.
        while self.pieces and not self._preformatted_depth and not self.pieces[-1].strip(" \n"):
            newlines = max(newlines, self.pieces.pop().replace(" ", ""), key=len)
        self.pieces.append(newlines)

    def _at_line_start(self):
        return not self.pieces or self.pieces[-1].endswith("\n")


def html_to_text(markup: str) -> str:
    """The visible text of an HTML document (steps 1 of the module docstring), not yet tidied."""
    extractor = _TextExtractor()
    extractor.feed(markup)
    extractor.close()
    return "".join(extractor.pieces)


def normalize_whitespace(text: str, keep_indent: bool = True) -> str:
    """Step 5: one space for each run inside a line, no trailing spaces, at most one blank line.

    Leading indentation is kept as it is, or removed with `keep_indent=False`.
    """
    lines = []
    for line in text.split("\n"):
        indent = _LEADING_SPACE.match(line).group() if keep_indent else ""
        body = _HORIZONTAL_RUN.sub(" ", line[len(indent):]).strip()
        lines.append(indent + body if body else "")
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip("\n")


def _remove_controls(text: str) -> tuple[str, int]:
    kept = [c for c in text
            if c in "\n\t" or (c not in _INVISIBLE_FORMAT and unicodedata.category(c) != "Cc")]
    return "".join(kept), len(text) - len(kept)


@dataclasses.dataclass(frozen=True)
class Normalize(stage.DocumentStage):
    """NFC, control characters, whitespace and (optionally) HTML: see the module docstring."""

    name = "normalize"
    Options = NormalizeOptions
    options: NormalizeOptions = dataclasses.field(default_factory=NormalizeOptions)

    def __call__(self, text: str) -> stage.Outcome:
        html_stripped = 0
        if self.options.strip_html:
            stripped = html_to_text(text)
            html_stripped = int(stripped != text)
            text = stripped
        text = _LINE_BOUNDARIES.sub("\n", text)
        text, control_removed = _remove_controls(text)
        composed = unicodedata.normalize("NFC", text)
        nfc_changed = int(composed != text)
        text = normalize_whitespace(composed, self.options.keep_indent)
        counts = dict(nfc_changed=nfc_changed, control_removed=control_removed,
                      html_stripped=html_stripped)
        if not text.strip():
            return stage.drop("empty", **counts)
        return stage.keep(text, **counts)
