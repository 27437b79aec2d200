"""PII scrubbing: e-mail addresses, phone numbers and IP addresses replaced with placeholders.

Regular expressions, applied in this order (each on the previous one's output, so an IP
address is never half-read as a phone number):

| kind   | placeholder    | matches                                                            |
|--------|----------------|--------------------------------------------------------------------|
| email  | `<EMAIL>`      | local@domain.tld: local part of letters, digits and `._%+-`; a     |
|        |                | dotted domain whose last label is 2+ letters                        |
| ip     | `<IP_ADDRESS>` | IPv6: the full 8-group form, `::`-compressed forms with 2+ groups   |
|        |                | one of them 2+ hex digits (so Python slices `a[1::2]` and C++ `::`  |
|        |                | are not addresses), an IPv4 tail (`::ffff:192.0.2.1`), a `%zone`;  |
|        |                | IPv4: four dotted octets 0..255, not inside a longer dotted number  |
| phone  | `<PHONE>`      | international: `+` and a 1-3 digit country code, then digit groups |
|        |                | (8..15 digits in all, E.164's maximum); national: an area code in  |
|        |                | parentheses followed by groups, or 3+ groups of 2..5 digits joined |
|        |                | by one kind of separator (space, `-` or `.`), or 2 groups the first |
|        |                | of which starts with a trunk 0 (`0114 4960000`, 9+ digits); 7..15  |
|        |                | digits in all; an extension (`x123`, `ext. 123`) is included;      |
|        |                | country codes do not start with 0                                   |

What is deliberately NOT a phone number: a plain run of digits without `+` (an id, an
amount, a year: ambiguous in running text, so Faker's bare-digit formats like `0604876475`
are missed, measured in the tests), dates (`2024-01-15`, `15.01.2024`, `01/15/2024`: `/`
is no separator, and 3 groups shaped like a date are skipped), versions and decimals
(`3.10.12`, `3.14159`: too few digits), thousands groupings (`10 000 000`: groups of
exactly 3 after a first of 1-3, unless 9+ digits not ending in 000), IPv4 addresses, ISBNs.
Measured on Faker's other numeric values in a sentence (300 each, tested): no match in dates,
ISO 8601 times, ISBN-10/13, EAN-13, zip codes, credit-card numbers, floats, versions, prices,
UUIDs, MAC addresses, IBANs, coordinates and year ranges; but US social security numbers
(`123-45-6789`) are replaced as phone numbers, so are three numbers in a row separated by
spaces (`643 860 961`), and a network address (`10.0.0.0/8`) as an IP address. Counts:
`email`, `phone`, `ip` (one per replacement).

    >>> from data.prepare.pii import ScrubPii
    >>> ScrubPii(ScrubPii.Options())("Mail jane.doe@example.org or call +1-202-555-0147 from 10.0.0.1.")
    Outcome(text='Mail <EMAIL> or call <PHONE> from <IP_ADDRESS>.', reason='', counts=(('email', 1), ('ip', 1), ('phone', 1)))
"""

import dataclasses
import re

from data.prepare import stage

__all__ = ["KINDS", "ScrubPii", "ScrubPiiOptions", "find"]

KINDS = ("email", "ip", "phone")  # the order they are applied in

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,}(?![\w-])")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
IPV4 = re.compile(rf"(?<![\w.]){_IPV4}(?!\.?\d|\w)")

_H = r"[0-9A-Fa-f]{1,4}"
_IPV6_FORMS = (
    rf"(?:{_H}:){{7}}{_H}",  # full
    rf"(?:{_H}:){{6}}{_IPV4}",  # full with an IPv4 tail
    rf"(?:(?:{_H}:){{1,7}}|:):(?:(?:{_H}:){{0,5}}{_IPV4}|(?:{_H}:){{0,6}}{_H})?",  # compressed
)
IPV6 = re.compile(rf"(?<![\w:.])(?:{'|'.join(_IPV6_FORMS)})(?:%[0-9A-Za-z]+)?(?![\w:]|\.\d)")

_SEP = r"[ .\-]"
PHONE = re.compile(
    r"(?<![\w+.\-/])(?:"
    rf"\+[1-9]\d{{0,2}}(?:{_SEP}?\(0\))?(?:{_SEP}?\(?\d{{1,5}}\)?)(?:{_SEP}?\d{{1,5}}){{1,5}}"  # +CC ...
    rf"|(?:\d{{1,2}}{_SEP}?)?\(\d{{2,5}}\){_SEP}?\d{{2,9}}(?:{_SEP}\d{{2,5}}){{0,3}}"  # (area) ...
    rf"|\d{{1,5}}{_SEP}\d{{2,5}}(?P<sep>{_SEP})\d{{2,5}}(?:(?P=sep)\d{{2,5}}){{0,3}}"  # 3+ groups
    rf"|0\d{{1,4}}{_SEP}\d{{4,8}}"  # trunk-0 area code + number
    r")(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w/]|[.\-]\w)")

_DATE = re.compile(r"\d{4}[.\-]\d{1,2}[.\-]\d{1,2}|\d{1,2}[.\-]\d{1,2}[.\-]\d{2,4}")
_THOUSANDS = re.compile(r"\d{1,3}(?:[ .]\d{3})+")


@dataclasses.dataclass(frozen=True)
class ScrubPiiOptions:
    kinds: tuple = stage.field(KINDS, "which kinds of PII to replace: email, ip, phone")
    email_placeholder: str = stage.field("<EMAIL>", "replacement for an e-mail address")
    phone_placeholder: str = stage.field("<PHONE>", "replacement for a phone number")
    ip_placeholder: str = stage.field("<IP_ADDRESS>", "replacement for an IPv4 or IPv6 address")

    def __post_init__(self):
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"--pii_kinds has {','.join(unknown)}; choose among {','.join(KINDS)}")


def _is_phone(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate.split("x")[0].split("ext")[0])
    if candidate.startswith("+"):
        return 8 <= digits <= 15
    if _DATE.fullmatch(candidate):
        return False
    if _THOUSANDS.fullmatch(candidate) and (digits < 9 or candidate.endswith("000")):
        return False  # a number written in thousands; 9+ digits not ending 000 is a phone
    if "(" not in candidate and len(re.findall(r"\d+", candidate)) == 2:
        return 9 <= digits <= 15  # trunk 0 + number: real ones have 9..11 digits
    return 7 <= digits <= 15


def find(text: str, kind: str) -> list[tuple[int, int]]:
    """The (start, end) spans of `kind` ("email", "ip" or "phone") in `text`, in order."""
    if kind == "email":
        return [m.span() for m in EMAIL.finditer(text)]
    if kind == "ip":
        spans = [m.span() for m in IPV6.finditer(text) if _is_ipv6(m.group())]
        spans += [m.span() for m in IPV4.finditer(text)
                  if not any(s <= m.start() < e for s, e in spans)]
        return sorted(spans)
    if kind == "phone":
        return [m.span() for m in PHONE.finditer(text) if _is_phone(m.group())]
    raise ValueError(f"unknown PII kind {kind!r}; choose among {KINDS}")


def _is_ipv6(candidate: str) -> bool:
    address = candidate.split("%")[0]
    if "::" not in address:
        return True
    groups = [g for g in address.split(":") if g]
    return len(groups) >= 2 and any(len(g) >= 2 for g in groups) and address.count("::") == 1


def _replace(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    pieces, last = [], 0
    for start, end in spans:
        pieces += [text[last:start], placeholder]
        last = end
    return "".join(pieces) + text[last:]


@dataclasses.dataclass(frozen=True)
class ScrubPii(stage.DocumentStage):
    """Replaces e-mail addresses, IP addresses and phone numbers: see the module docstring."""

    name = "pii"
    Options = ScrubPiiOptions
    options: ScrubPiiOptions = dataclasses.field(default_factory=ScrubPiiOptions)

    def __call__(self, text: str) -> stage.Outcome:
        placeholders = {"email": self.options.email_placeholder, "ip": self.options.ip_placeholder,
                        "phone": self.options.phone_placeholder}
        counts = {}
        for kind in KINDS:
            if kind in self.options.kinds:
                spans = find(text, kind)
                text = _replace(text, spans, placeholders[kind])
                counts[kind] = len(spans)
        return stage.keep(text, **counts)
