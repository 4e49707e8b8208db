"""ExactMatch (rlkit.rl.graders.exact_match): the tagged answer equals the reference, up to
whitespace and, optionally, case."""

from __future__ import annotations

import pytest

from rlkit.rl.graders.exact_match import ExactMatch
from tests.helpers import RIGHT, UNFORMATTED, WRONG


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
