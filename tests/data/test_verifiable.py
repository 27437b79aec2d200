"""data.verifiable: exact verifiers (right and wrong answers, formats), splits disjoint and
fixed by the seed, answers that are the arithmetic they claim, mathematics_dataset offline."""

import random
import re
from fractions import Fraction

import numpy as np
import pytest

from data import verifiable as v

SMALL = v.TaskConfig(num_train=300, num_eval=60)


@pytest.mark.parametrize("name", ["addition", "multiplication", "sorting", "math/arithmetic__add_or_sub"])
def test_splits_are_disjoint_sized_and_fixed_by_the_seed(name):
    train, held_out = v.generate(name, SMALL)
    assert len(train) == 300 and len(held_out) == 60
    prompts = [p.prompt for p in train + held_out]
    assert len(set(prompts)) == len(prompts)  # no prompt twice, none shared between the splits
    again = v.generate.__wrapped__(name, SMALL)  # not the cache: generated anew
    assert again == (train, held_out)
    other = v.generate(name, v.TaskConfig(num_train=300, num_eval=60, seed=1))
    assert {p.prompt for p in other[1]} != {p.prompt for p in held_out}


def test_generation_leaves_the_global_random_state_alone():
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    v.generate.__wrapped__("math/arithmetic__mul", v.TaskConfig(num_train=20, num_eval=5))
    assert (random.random(), np.random.rand()) == expected


def test_answers_are_the_arithmetic_of_the_prompts():
    for p in v.generate("addition", SMALL)[0]:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", p.prompt).groups())
        assert int(p.answer) == a + b and a < 100 and b < 100 and p.completion == p.answer
    for p in v.generate("multiplication", v.TaskConfig(num_train=50, num_eval=10, digits=3))[0]:
        a, b = map(int, re.fullmatch(r"(\d+)\*(\d+)=", p.prompt).groups())
        assert int(p.answer) == a * b and a < 1000 and b < 1000
    for p in v.generate("sorting", v.TaskConfig(num_train=50, num_eval=10, list_len=7, max_value=30))[0]:
        values = list(map(int, re.fullmatch(r"sort ([\d ]+)=", p.prompt).group(1).split()))
        assert len(values) == 7 and max(values) < 30
        assert list(map(int, p.answer.split())) == sorted(values)


def test_mathematics_dataset_generates_offline_with_its_verifier():
    train, held_out = v.generate("math/arithmetic__div", v.TaskConfig(num_train=40, num_eval=10))
    for p in train + held_out:
        assert len(p.prompt) <= v.MATH_MAX_QUESTION and p.answer
        assert v.verify(p.task, p.answer, p.answer)
    # The package's own arithmetic: "Divide A by B." has the answer A/B.
    divisions = [p for p in train if re.fullmatch(r"Divide -?\d+ by -?\d+\.", p.prompt)]
    assert divisions
    for p in divisions:
        a, b = map(int, re.findall(r"-?\d+", p.prompt))
        assert Fraction(p.answer) == Fraction(a, b)


@pytest.mark.parametrize("module", v.MATH_MODULES)
def test_every_arithmetic_module_generates(module):
    train, held_out = v.generate(v.MATH_PREFIX + module, v.TaskConfig(num_train=3, num_eval=2))
    assert len(train) == 3 and len(held_out) == 2


def test_integer_verifier():
    assert v.verify("addition", "46", "46") and v.verify("addition", " 46\n", "46") and v.verify("addition", "046", "46")
    assert not v.verify("addition", "47", "46")
    assert not v.verify("addition", "46.0", "46") and not v.verify("addition", "4 6", "46")
    assert not v.verify("addition", "", "46") and not v.verify("addition", "forty-six", "46")


def test_list_verifier():
    assert v.verify("sorting", "1 3 5", "1 3 5") and v.verify("sorting", "1, 3, 5", "1 3 5")
    assert not v.verify("sorting", "1 5 3", "1 3 5") and not v.verify("sorting", "1 3", "1 3 5")
    assert not v.verify("sorting", "1 3 5 7", "1 3 5") and not v.verify("sorting", "1 3 x", "1 3 5")
    assert not v.verify("sorting", "", "1 3 5")


def test_expression_verifier():
    name = "math/arithmetic__div"
    assert v.verify(name, "-5/18", "-5/18") and v.verify(name, "0.5", "1/2") and v.verify(name, "-3", "-3")
    assert not v.verify(name, "5/18", "-5/18") and not v.verify(name, "0.51", "1/2")
    surd = "math/arithmetic__simplify_surd"
    assert v.verify(surd, "-48*sqrt(3) - 9/8", "-48*sqrt(3) - 9/8")
    assert v.verify(surd, "-48*sqrt(3)-9/8", "-48*sqrt(3) - 9/8")
    assert not v.verify(surd, "48*sqrt(3) - 9/8", "-48*sqrt(3) - 9/8") and not v.verify(surd, " ", "x")


def test_tags_format():
    train, _ = v.generate("addition", v.TaskConfig(num_train=5, num_eval=5, format="tags"))
    p = train[0]
    assert p.prompt.endswith(v.TAGS_INSTRUCTION)
    assert re.fullmatch(r"<think>\n.+\n</think>\n<answer>\n(\d+)\n</answer>", p.completion).group(1) == p.answer


def test_bad_tasks_and_sizes_fail_in_one_line():
    with pytest.raises(ValueError, match="unknown verifiable task 'subtraction'"):
        v.generate("subtraction", SMALL)
    with pytest.raises(ValueError, match="has 100 distinct problems"):
        v.generate("addition", v.TaskConfig(num_train=90, num_eval=20, digits=1))
    with pytest.raises(ValueError, match="verifiable.digits"):
        v.TaskConfig(digits=0)
    with pytest.raises(ValueError, match="verifiable.math_difficulty"):
        v.TaskConfig(math_difficulty="extreme")
