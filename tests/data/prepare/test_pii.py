"""pii: recall on Faker's e-mail addresses, phone numbers (11 locales) and IPv4 / IPv6 addresses
embedded in sentences, each found exactly (its span, nothing more); every IP match parses with
the stdlib `ipaddress`; no match at all in CPython's embedded documentation or on dates,
versions, decimals, years, slices and times; placeholders, counts and options."""

import collections
import ipaddress
import random
import re
from pydoc_data.topics import topics

import pytest
from faker import Faker

from data.prepare import pii
from data.prepare.pii import ScrubPii

PHONE_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_PT", "pl_PL",
                 "ru_RU", "sv_SE")
TEMPLATES = ("Please call {} today.", "Contact: {}", "({}) is the number.", "Write to {}, thanks.",
             "Reach us at {}; we answer.")


def _embedded(values, seed):
    """Each value in a sentence: (sentence, value's span)."""
    rng = random.Random(seed)
    cases = []
    for value in values:
        template = rng.choice(TEMPLATES)
        start = template.index("{}")
        cases.append((template.format(value), (start, start + len(value))))
    return cases


def _recall(kind, values, seed=0):
    """Fraction of values found with exactly their span (and no other match in the sentence)."""
    misses = [s for s, span in _embedded(values, seed) if pii.find(s, kind) != [span]]
    return 1 - len(misses) / len(values), misses


def _faker(locale, seed):
    fake = Faker(locale)
    fake.seed_instance(seed)
    return fake


def test_phone_recall_per_locale():
    formatted_total, formatted_found, overall = 0, 0, {}
    for index, locale in enumerate(PHONE_LOCALES):
        fake = _faker(locale, index)
        numbers = [fake.phone_number() for _ in range(100)]
        formatted = [n for n in numbers if not n.isdigit()]
        recall, misses = _recall("phone", formatted)
        assert recall == 1.0, (locale, misses[:5])
        found = len(formatted) - len(misses)
        overall[locale] = found / len(numbers)
        formatted_total += len(formatted)
        formatted_found += found
    print(f"\nphone recall: formatted {formatted_found}/{formatted_total}; all formats per locale "
          + ", ".join(f"{l} {r:.2f}" for l, r in overall.items()))
    # Bare digit runs (Faker's '0604876475') are not phone numbers to the scrubber, on purpose.
    assert pii.find("Please call 0604876475 today.", "phone") == []


@pytest.mark.parametrize("locale", ["en_US", "de_DE", "fr_FR", "ru_RU", "ja_JP"])
def test_email_recall(locale):
    fake = _faker(locale, 1)
    emails = [fake.email() for _ in range(100)] + [fake.free_email() for _ in range(50)]
    recall, misses = _recall("email", emails)
    assert recall == 1.0, misses[:5]


def _compressed_ipv6(rng):
    """Random IPv6 addresses with a run of zero groups, so that str() compresses them."""
    groups = [rng.randrange(1, 1 << 16) for _ in range(8)]
    start = rng.randrange(7)
    for i in range(start, min(8, start + rng.randrange(2, 6))):
        groups[i] = 0
    return str(ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups)))


def test_ip_recall_and_validity():
    fake = _faker("en_US", 2)
    rng = random.Random(3)
    values = ([fake.ipv4() for _ in range(200)] + [fake.ipv4_private() for _ in range(50)]
              + [fake.ipv6() for _ in range(200)] + [_compressed_ipv6(rng) for _ in range(200)]
              + ["::ffff:192.0.2.1", "fe80::1%eth0", "2001:db8::8a2e:370:7334", "255.255.255.255",
                 "0.0.0.0", "1::ab"])
    assert any("::" in v for v in values)
    recall, misses = _recall("ip", values)
    assert recall == 1.0, misses[:5]
    text = " and ".join(values)
    for start, end in pii.find(text, "ip"):
        ipaddress.ip_address(text[start:end].split("%")[0])  # raises if not an address


@pytest.mark.parametrize("text", [
    "On 2024-01-15, 15.01.2024 and 01/15/2024 it rained.",
    "Python 3.10.12 replaced 3.9.18; see PEP 440 and 1.2.3.4.5.",
    "pi is 3.14159 and e is 2.71828, about 10 000 000 or 1 000 000 000 people.",
    "From 1990-2000 and in 2023 there were 1234567890 records, id 000123.",
    "Use a[1::2], x[::2], a[::-1], std::vector and Foo::Bar; meet at 12:30:45.",
    "IP-like but invalid: 256.1.1.1 and 1.2.3 and 192.168.1.",
    "An ISBN 978-3-16-148410-0 and a price of $1,299.99.",
])
def test_no_false_positives_on_numbers(text):
    assert ScrubPii()(text) == (text, "", ())


def test_no_matches_in_pydoc_topics():
    found = collections.Counter()
    for key in sorted(topics):
        for kind in pii.KINDS:
            found[kind] += len(pii.find(topics[key], kind))
    assert dict(found) == {kind: 0 for kind in pii.KINDS}


def test_scrub_replaces_and_counts():
    text = ("Mail jane.doe@example.org or j@x.co.uk, call +44 20 7946 0958 or (020) 7946 0958 "
            "from 10.0.0.1 or 2001:db8::1:2.")
    outcome = ScrubPii()(text)
    assert outcome.text == ("Mail <EMAIL> or <EMAIL>, call <PHONE> or <PHONE> "
                            "from <IP_ADDRESS> or <IP_ADDRESS>.")
    assert dict(outcome.counts) == {"email": 2, "ip": 2, "phone": 2}
    only_email = ScrubPii(ScrubPii.Options(kinds=("email",), email_placeholder="[e]"))(text)
    assert only_email.text.startswith("Mail [e] or [e], call +44 20 7946 0958")
    assert dict(only_email.counts) == {"email": 1 + 1}
    assert ScrubPii()("nothing here") == ("nothing here", "", ())


def test_scrubbing_is_idempotent():
    fake = _faker("en_US", 4)
    text = " ".join(f"{fake.sentence()} {fake.email()} {fake.phone_number()} {fake.ipv4()}"
                    for _ in range(50))
    once = ScrubPii()(text).text
    assert ScrubPii()(once) == (once, "", ())
    assert not re.search(r"@\w", once)


def test_bad_kind_fails_with_a_message():
    with pytest.raises(ValueError, match="--pii_kinds has ssn; choose among email,ip,phone"):
        ScrubPii.Options(kinds=("email", "ssn"))


def test_no_matches_in_fakers_other_numbers():
    fake = _faker("en_US", 5)
    makers = {
        "date": fake.date, "iso8601": fake.iso8601, "time": fake.time, "isbn10": fake.isbn10,
        "isbn13": fake.isbn13, "ean13": fake.ean13, "zipcode": fake.zipcode,
        "credit card": fake.credit_card_number, "iban": fake.iban, "mac": fake.mac_address,
        "uuid": lambda: str(fake.uuid4()), "float": lambda: str(fake.pyfloat()),
        "coordinates": lambda: f"{fake.latitude()}, {fake.longitude()}",
        "version": lambda: f"{fake.random_int(0, 20)}.{fake.random_int(0, 30)}.{fake.random_int(0, 99)}",
        "price": lambda: f"${fake.random_int(1, 10**6):,}.{fake.random_int(0, 99):02d}",
        "year range": lambda: f"{fake.year()}-{fake.year()}",
    }
    for name, make in makers.items():
        for _ in range(300):
            text = f"The value is {make()} here."
            assert ScrubPii()(text).text == text, name


def test_docstring_example():
    import doctest

    from data.prepare import pii as module

    result = doctest.testmod(module)
    assert result.attempted and not result.failed
