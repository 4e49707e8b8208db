"""Numeric: the answer is a number close enough to the reference, however it is written."""

from __future__ import annotations

import math
import re

from rlkit.rl.envs.base import Grade
from rlkit.rl.graders.base import GraderError, check_tag, check_tolerance, parse_number, tagged

# A number in running text: sign (not after a word, so "3-4" is 3 and 4), commas, decimals, a/b.
_IN_TEXT = re.compile(
    r"(?:(?<![\w)])[+-])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?"
    r"|(?:(?<![\w)])[+-])?\.\d+"
)


def numbers_in(text: str) -> list[str]:
    """Every number written in `text`, in order, as written (read one with `parse_number`)."""
    return _IN_TEXT.findall(text)


def last_number(text: str) -> str | None:
    """The last number written in `text`: models often end with the result even without tags."""
    found = numbers_in(text)
    return found[-1] if found else None


class Numeric:
    """So "1,234", "1234.0" and "2468/2" all match a reference of 1234."""

    def __init__(
        self,
        tag: str = "answer",
        rel_tol: float = 0.0,
        abs_tol: float = 1e-9,
        last_number: bool = False,
    ) -> None:
        self.tag = check_tag(tag)
        self.rel_tol = check_tolerance("rel_tol", rel_tol)
        self.abs_tol = check_tolerance("abs_tol", abs_tol)
        self.last_number = last_number

    def _answer(self, completion: str) -> str | None:
        answer = tagged(completion, self.tag)
        if answer is None and self.last_number:
            answer = last_number(completion)
        return answer

    def __call__(self, completion: str, reference: str) -> Grade:
        expected = parse_number(reference)
        if expected is None:
            raise GraderError(f"Numeric grader cannot read reference {reference!r} as a number")
        answer = self._answer(completion)
        value = None if answer is None else parse_number(answer)
        if value is None:
            return Grade(correct=False, formatted=False)
        close = math.isclose(value, expected, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return Grade(correct=close, formatted=True)
