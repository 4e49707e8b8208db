"""MathAnswer (rlkit.rl.graders.math_answer): the last \\boxed{...}, compared after LaTeX
normalisation or as numbers; its linear-time parsers against the quadratic originals."""

from __future__ import annotations

import pytest

from rlkit.rl.graders.base import GraderError
from rlkit.rl.graders.math_answer import MathAnswer, normalize_latex
from tests.helpers import RIGHT, UNFORMATTED, WRONG


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
