"""Regex (rlkit.rl.graders.regex): the answer is a capture group of a pattern."""

from __future__ import annotations

import pytest

from rlkit.rl.graders.regex import Regex
from tests.helpers import RIGHT, UNFORMATTED, WRONG


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
