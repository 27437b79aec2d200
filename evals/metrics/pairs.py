"""Hypotheses paired with their references: the input convention the text metrics share.

`references[i]` is the list of references of `hypotheses[i]` (a str is taken as one reference,
and None entries are dropped, so hypotheses may have different numbers of references). This
differs from sacrebleu's layout, where `references[j]` is the j-th reference *stream* over all
hypotheses and missing references are padded with None.
"""

from collections.abc import Sequence


def reference_lists(
    hypotheses: Sequence[str], references: Sequence[Sequence[str] | str], metric: str
) -> list[list[str]]:
    """Checks hypotheses against references and returns one list of reference strings each.

    Args:
      hypotheses: the system outputs, one string each.
      references: references[i] is the list of references of hypotheses[i] (or one str).
      metric: the metric's name, for the error messages.

    Returns:
      A list of lists of strings, one non-empty list per hypothesis.

    Raises:
      ValueError: naming what is wrong (a str instead of a list, different lengths, a
        hypothesis without references, an item that is not a string) and what would be right.
    """
    if isinstance(hypotheses, str) or isinstance(references, str):
        which = "hypotheses" if isinstance(hypotheses, str) else "references"
        raise ValueError(
            f"{metric}: {which} is a single string; pass a list with one entry per hypothesis "
            f"(or use sentence_{metric} for one sentence)")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{metric}: {len(hypotheses)} hypotheses but {len(references)} reference lists; "
            "pass one list of references per hypothesis (references[i] belongs to hypotheses[i])")
    if not hypotheses:
        raise ValueError(f"{metric}: no hypotheses; pass at least one hypothesis and its references")
    out = []
    for i, (hypothesis, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hypothesis, str):
            raise ValueError(f"{metric}: hypotheses[{i}] is a {type(hypothesis).__name__}, not a str; "
                             "pass strings (use '' for an empty output)")
        if isinstance(refs, str):
            refs = [refs]
        else:
            try:
                refs = [r for r in refs if r is not None]
            except TypeError:
                raise ValueError(f"{metric}: references[{i}] is a {type(refs).__name__}; pass a list of "
                                 "reference strings (or one str)") from None
        if not refs:
            raise ValueError(f"{metric}: hypotheses[{i}] has no references; give each hypothesis "
                             "at least one reference string (an empty reference is '')")
        for r in refs:
            if not isinstance(r, str):
                raise ValueError(f"{metric}: a reference of hypotheses[{i}] is a {type(r).__name__}, "
                                 "not a str; references[i] must be a list of strings")
        out.append(refs)
    return out
