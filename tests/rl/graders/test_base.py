"""What every grader reads (rlkit.rl.graders.base): numbers and tags as people write them,
bad tags refused, hostile completions read in linear time and within a bounded length; and each
grader's YAML lists its arguments and instantiates."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlkit.rl.envs.base import Grade
from rlkit.rl.graders.base import parse_number, tagged
from rlkit.rl.graders.exact_match import ExactMatch
from rlkit.rl.graders.math_answer import MathAnswer, normalize_latex
from rlkit.rl.graders.numeric import Numeric
from tests.helpers import RIGHT

GRADER_CONF = Path(__file__).parents[3] / "conf" / "grader"


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


@pytest.mark.parametrize("tag", ["", "an swer", "a>b", 3])
def test_bad_tag_is_refused(tag):
    with pytest.raises(ValueError, match="grader.tag must be"):
        ExactMatch(tag=tag)


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
