"""Math answers: the last \\boxed{...}, compared after LaTeX normalisation or as numbers.

Models trained on competition math write `\\boxed{\\dfrac{1}{2}}`, `\\boxed{x = 5}` or
`\\boxed{90^\\circ}`; references say `\\frac12`, `5`, `90`. Normalising both sides removes
notation that does not change the answer. Nothing is eval()ed: numbers are read by
`parse_number` and a plain `\\frac{a}{b}`, anything else compares as text.
"""

from __future__ import annotations

import math
import re

from rlkit.rl.envs.base import Grade
from rlkit.rl.graders.base import (
    MAX_READ,
    GraderError,
    check_tag,
    check_tolerance,
    parse_number,
    tagged,
)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DROP = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;: ]|\^\{?\\circ\}?|\\?%|\$")
_WRAPPER_OPEN = re.compile(r"\\(?:text|textbf|mathrm)\{")
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?=(?!=)")
_FRAC = re.compile(r"(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} whose braces balance (a truncated one is skipped).

    One pass over the text (of at most its last MAX_READ characters) with a stack of open
    braces: linear time, whatever a model writes (`\\boxed{` 50,000 times included)."""
    text = text[-MAX_READ:]
    openers = {m.end() - 1: m.end() for m in _BOX.finditer(text)}  # its "{" -> content start
    stack: list[int | None] = []  # per open brace: its box's content start, or None
    best: tuple[int, int] | None = None  # (content start, end) of the last-opened closed box
    for i, char in enumerate(text):
        if char == "{":
            stack.append(openers.get(i))
        elif char == "}" and stack:
            start = stack.pop()
            if start is not None and (best is None or start > best[0]):
                best = (start, i)
    return None if best is None else text[best[0] : best[1]].strip()


def _unwrap(text: str) -> str:
    """\\text{...}, \\textbf{...}, \\mathrm{...} replaced by their content, innermost first, where
    the content holds no other braces (as repeating a regex substitution would, but in one
    pass: 20,000 nested wrappers took 50 s that way)."""
    wrappers = {m.end() - 1: m.start() for m in _WRAPPER_OPEN.finditer(text)}  # "{" -> start
    keep = [True] * len(text)
    stack: list[list] = []  # per open brace: [its index, holds a kept brace group]
    for i, char in enumerate(text):
        if char == "{":
            stack.append([i, False])
        elif char == "}" and stack:
            brace, nested = stack.pop()
            if brace in wrappers and not nested:
                keep[wrappers[brace] : brace + 1] = [False] * (brace + 1 - wrappers[brace])
                keep[i] = False
            elif stack:
                stack[-1][1] = True  # a kept brace group: its parent's content has braces
    return "".join(c for c, k in zip(text, keep, strict=True) if k)


def normalize_latex(text: str) -> str:
    """Canonical text of an answer: notation that does not change its value removed."""
    text = re.sub(r"\\[dt]frac", r"\\frac", text).replace("{,}", ",")
    text = _unwrap(text)
    text = "".join(_DROP.sub("", text).split()).removesuffix(".")
    text = _ASSIGNMENT.sub("", text)
    text = re.sub(r"\\frac(\d)", r"\\frac{\1}", text)
    return re.sub(r"(\\frac\{[^{}]*\})(\d)", r"\1{\2}", text)


def to_number(text: str) -> float | None:
    """The value of a normalised answer that is a plain number or `\\frac{a}{b}` of numbers."""
    value = parse_number(text)
    match = _FRAC.fullmatch(text) if value is None else None
    if match is not None:
        numerator, denominator = parse_number(match[2]), parse_number(match[3])
        if numerator is not None and denominator:
            value = (-1 if match[1] else 1) * numerator / denominator
    return value


class MathAnswer:
    """The last boxed answer (else the tagged one) equals the reference as LaTeX or as a number."""

    def __init__(self, tag: str = "answer", rel_tol: float = 0.0, abs_tol: float = 1e-9) -> None:
        self.tag = check_tag(tag)
        self.rel_tol = check_tolerance("rel_tol", rel_tol)
        self.abs_tol = check_tolerance("abs_tol", abs_tol)

    def _same(self, answer: str, reference: str) -> bool:
        if answer == reference:
            return True
        a, b = to_number(answer), to_number(reference)
        if a is None or b is None:
            return False
        return math.isclose(a, b, rel_tol=self.rel_tol, abs_tol=self.abs_tol)

    def __call__(self, completion: str, reference: str) -> Grade:
        expected = normalize_latex(reference)
        if not expected:
            raise GraderError(f"MathAnswer grader got an empty reference {reference!r}")
        answer = last_boxed(completion)
        if answer is None:
            answer = tagged(completion, self.tag)
        if answer is None:
            return Grade(correct=False, formatted=False)
        return Grade(correct=self._same(normalize_latex(answer), expected), formatted=True)
