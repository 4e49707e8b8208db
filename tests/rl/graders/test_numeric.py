"""Numeric (rlkit.rl.graders.numeric): the answer is a number close enough to the reference,
however it is written."""

from __future__ import annotations

import pytest

from rlkit.api.errors import RlkitError
from rlkit.rl.graders.base import GraderError
from rlkit.rl.graders.numeric import Numeric
from tests.helpers import RIGHT, UNFORMATTED, WRONG


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
