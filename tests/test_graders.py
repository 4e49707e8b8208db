"""Graders read the answer a completion states and judge it against the reference."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlkit.api.errors import RlkitError
from rlkit.rl.envs.base import Grade
from rlkit.rl.graders.base import GraderError, parse_number, tagged
from rlkit.rl.graders.exact_match import ExactMatch
from rlkit.rl.graders.math_answer import MathAnswer, normalize_latex
from rlkit.rl.graders.numeric import Numeric
from rlkit.rl.graders.regex import Regex

GRADER_CONF = Path(__file__).parents[1] / "conf" / "grader"
RIGHT, WRONG, UNFORMATTED = Grade(True, True), Grade(False, True), Grade(False, False)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", 1234.0),
        ("-3.5", -3.5),
        ("+2", 2.0),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("$1,000", 1000.0),
        ("50%", 50.0),
        ("1e3", 1000.0),
        (".5", 0.5),
        ("  42. ", 42.0),
        ("1,234,567.25", 1234567.25),
    ],
)
def test_parse_number_reads_how_people_write_answers(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text", ["abc", "", "1,23", "1234,567", "1/0", "3 4", "1.2.3", "--1", "inf"]
)
def test_parse_number_rejects_what_is_not_one_number(text):
    assert parse_number(text) is None


def test_tagged_takes_the_first_tag_across_lines():
    assert tagged("<answer> a\nb </answer> <answer>c</answer>", "answer") == "a\nb"
    assert tagged("<answer>unclosed", "answer") is None


@pytest.mark.parametrize(
    ("completion", "grade"),
    [
        ("so <answer>Paris</answer>", RIGHT),
        ("<answer>  Paris \n</answer>", RIGHT),
        ("<answer>paris</answer>", WRONG),
        ("<answer>London</answer> <answer>Paris</answer>", WRONG),
        ("The answer is Paris", UNFORMATTED),
    ],
)
def test_exact_match(completion, grade):
    assert ExactMatch()(completion, "Paris") == grade


def test_exact_match_collapses_whitespace_and_can_ignore_case():
    assert ExactMatch()("<answer>New   York\nCity</answer>", " New York City ").correct
    assert ExactMatch(case_sensitive=False)("<answer>NEW york</answer>", "New York").correct
    assert ExactMatch(tag="final")("<final>B</final>", "B") == RIGHT


@pytest.mark.parametrize("tag", ["", "an swer", "a>b", 3])
def test_bad_tag_is_refused(tag):
    with pytest.raises(ValueError, match="grader.tag must be"):
        ExactMatch(tag=tag)


@pytest.mark.parametrize(
    ("completion", "reference", "grade"),
    [
        ("<answer>1,234</answer>", "1234", RIGHT),
        ("<answer>3/4</answer>", "0.75", RIGHT),
        ("<answer>$1,000.00</answer>", "1000", RIGHT),
        ("<answer>1233</answer>", "1234", WRONG),
        ("<answer>about twelve</answer>", "12", UNFORMATTED),
        ("the answer is 1234", "1234", UNFORMATTED),
    ],
)
def test_numeric(completion, reference, grade):
    assert Numeric()(completion, reference) == grade


def test_numeric_tolerance():
    assert not Numeric()("<answer>3.14</answer>", "3.14159").correct
    assert Numeric(abs_tol=0.01)("<answer>3.14</answer>", "3.14159").correct
    assert Numeric(rel_tol=0.01)("<answer>101</answer>", "100").correct
    assert not Numeric(rel_tol=0.001)("<answer>101</answer>", "100").correct


def test_numeric_falls_back_to_the_last_number_only_when_asked():
    completion = "3 + 4 = 7, and 7 * 6 = 42."
    assert Numeric(last_number=True)(completion, "42") == RIGHT
    assert Numeric(last_number=True)("I get 1,250 then -3/4", "-0.75") == RIGHT
    assert Numeric(last_number=True)("<answer>7</answer> then 42", "42") == WRONG
    assert Numeric(last_number=True)("no digits here", "42") == UNFORMATTED


def test_numeric_bad_reference_raises_grader_error_naming_it():
    with pytest.raises(GraderError, match="Numeric.*'abc'") as info:
        Numeric()("<answer>1</answer>", "abc")
    assert isinstance(info.value, RlkitError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["rel_tol", "abs_tol"])
def test_numeric_negative_tolerance_is_refused(name):
    with pytest.raises(ValueError, match=f"grader.{name}"):
        Numeric(**{name: -0.1})


@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        (r"so \boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{\dfrac{3}{4}}", r"\frac34"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),
        (r"\boxed{90^\circ}", "90"),
        (r"\boxed{90^{\circ}}", "90"),
        (r"\boxed{x = 5}", "5"),
        (r"\boxed{0.50}", ".5"),
        (r"\boxed{-\frac{3}{4}}", "-0.75"),
        (r"\boxed{12\text{ cm}}", "12 cm"),
        (r"\boxed{\text{(B)}}", "(B)"),
        (r"$\boxed{\left( 1, 2 \right)}$", "(1,2)"),
        (r"\boxed{50\%}", "50"),
        (r"\fbox{7}", "7"),
        (r"no box but <answer>\tfrac{1}{4}</answer>", "0.25"),
        (r"first \boxed{3}, then corrected: \boxed{4}", "4"),
    ],
)
def test_math_answer_right(completion, reference):
    assert MathAnswer()(completion, reference) == RIGHT


@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}"),
        (r"\boxed{4}, no wait \boxed{3}", "4"),
        (r"\boxed{(1,3)}", "(1,2)"),
    ],
)
def test_math_answer_wrong(completion, reference):
    assert MathAnswer()(completion, reference) == WRONG


def test_math_answer_unformatted_and_truncated_boxes():
    assert MathAnswer()("the answer is 5", "5") == UNFORMATTED
    assert MathAnswer()(r"\boxed{\frac{1}{2", "0.5") == UNFORMATTED
    assert MathAnswer()(r"\boxed{2} and then \boxed{\frac{1", "2") == RIGHT


def test_math_answer_tolerance_and_bad_reference():
    assert not MathAnswer()(r"\boxed{3.14}", r"3.1416").correct
    assert MathAnswer(abs_tol=0.01)(r"\boxed{3.14}", r"3.1416").correct
    with pytest.raises(GraderError, match="MathAnswer"):
        MathAnswer()(r"\boxed{1}", " $ $ ")


def test_normalize_latex():
    assert normalize_latex(r"\dfrac12") == r"\frac{1}{2}"
    assert normalize_latex(r"\frac{1}2.") == r"\frac{1}{2}"
    assert normalize_latex(r"y_1 = 2\,x\!+\;1") == "2x+1"
    assert normalize_latex(r"\mathrm{\textbf{ab}}") == "ab"
    assert normalize_latex(r"x \rightarrow 0") == r"x\rightarrow0"


@pytest.mark.parametrize(
    ("completion", "reference", "grade"),
    [
        ("Final answer: B", "B", RIGHT),
        ("Final answer:   C  ", "B", WRONG),
        ("final answer: b", "B", UNFORMATTED),
        ("I think B", "B", UNFORMATTED),
    ],
)
def test_regex(completion, reference, grade):
    assert Regex(r"Final answer:(.*)")(completion, reference) == grade


def test_regex_group_and_ignore_case():
    grader = Regex(r"(?P<verb>says|answers) (\w+)", group=2, ignore_case=True)
    assert grader("She ANSWERS Yes", "yes") == RIGHT
    assert Regex(r"\d+", group=0)("it is 42 now", "42") == RIGHT
    assert Regex(r"answer: (a)?(b)")("answer: b", "") == RIGHT


def test_regex_bad_pattern_or_group_is_refused():
    with pytest.raises(ValueError, match=r"grader.pattern '\(unclosed' does not compile"):
        Regex("(unclosed")
    with pytest.raises(ValueError, match="grader.group"):
        Regex(r"(a)(b)", group=3)


# Options that are another grader's YAML with some values changed (their `defaults`), and what.
DERIVED = {"last_number": {"last_number": True}}


@pytest.mark.parametrize("path", sorted(GRADER_CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_grader_yaml_lists_its_arguments_and_instantiates(path):
    from rlkit.run.config import compose

    node = OmegaConf.to_container(compose([f"grader={path.stem}"]).grader)
    module, _, name = node.pop("_target_").rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    parameters = inspect.signature(cls).parameters
    assert set(node) == set(parameters)
    changed = DERIVED.get(path.stem, {})
    for key, parameter in parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            assert node[key] == changed.get(key, parameter.default), key
    grader = cls(**node)
    assert grader("<answer>42</answer>", "42") == RIGHT


def test_there_is_a_yaml_for_each_grader():
    assert {p.stem for p in GRADER_CONF.glob("*.yaml")} == {
        "exact_match",
        "numeric",
        "math",
        "regex",
        *DERIVED,
    }


# ---- what a model writes is adversarial: linear-time parsing -----------------------------------
def _old_last_boxed(text):
    """The quadratic original (a scan to the end from every opener): the oracle."""
    import re

    found = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i].strip()
                break
    return found


def _old_unwrap(text):
    import re

    wrapper = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")
    while wrapper.search(text):
        text = wrapper.sub(r"\1", text)
    return text


def test_the_linear_parsers_agree_with_the_quadratic_ones_on_random_text():
    import random

    from rlkit.rl.graders.math_answer import _unwrap, last_boxed

    pieces = ["\\boxed{", "\\fbox {", "\\text{", "\\mathrm{", "{", "}", "}", "1", "x", " "]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert last_boxed(text) == _old_last_boxed(text), text
        assert _unwrap(text) == _old_unwrap(text), text


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{" * 50_000,  # 350 KB: did not finish in 60 s
        "<answer>" * 50_000,  # a lazy regex rescans to the end from every unclosed tag
        "\\boxed{" + "\\text{" * 5_000 + "5" + "}" * 5_001,  # nested wrappers, inside the cap
    ],
)
def test_hostile_completions_are_graded_in_linear_time(completion):
    """Each took seconds to minutes when quadratic; now well under a second (no timing asserted:
    a quadratic parser would hang this test instead)."""
    boxed = completion.startswith("\\boxed{\\text")
    assert MathAnswer()(completion, "5") == Grade(correct=boxed, formatted=boxed)
    assert ExactMatch()(completion, "5").formatted is False
    assert Numeric()(completion, "5").formatted is False


def test_nested_wrappers_normalise_in_one_pass_and_graders_read_a_bounded_length():
    from rlkit.rl.graders.base import MAX_READ

    assert normalize_latex("\\text{" * 20_000 + "5" + "}" * 20_000) == "5"  # took 50 s
    # A tag is read in the first MAX_READ characters, a box in the last.
    assert tagged("<answer>" * 1_000 + "7</answer>", "answer") == "<answer>" * 999 + "7"
    assert tagged("x" * MAX_READ + "<answer>7</answer>", "answer") is None
    assert MathAnswer()("\\boxed{5}" + "x" * MAX_READ, "5").formatted is False
