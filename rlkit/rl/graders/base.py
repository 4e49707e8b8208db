"""The grader protocol: `grader(completion, reference) -> Grade`.

A grader reads the answer a completion states and compares it with the reference answer, so an
environment can hand its `grade` to one instead of re-writing answer parsing per task. Graders are
configured like every other plugin: a YAML in conf/grader/ names the class with `_target_` and
lists its keyword arguments, and Hydra instantiates it. `formatted` says an answer was stated in
the expected form at all (a format reward can use it); `correct` says it is the right one.

A reference the grader cannot read (a numeric grader given "abc") is a data-set bug, not a wrong
completion, so it raises `GraderError` rather than grading every completion wrong.
"""

from __future__ import annotations

import re
from typing import Protocol

from rlkit.api.errors import RlkitError
from rlkit.rl.envs.base import Grade


class GraderError(RlkitError, ValueError):
    """A reference answer the grader cannot read; the message names the grader and reference."""


class Grader(Protocol):
    def __call__(self, completion: str, reference: str) -> Grade: ...


_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?"
_NUMBER = re.compile(rf"([+-]?)\$?({_UNSIGNED})(?:/({_UNSIGNED}))?")


def check_tag(tag: object) -> str:
    """Tags go into a regex and into prompts, so only plain word characters are allowed."""
    if not isinstance(tag, str) or not re.fullmatch(r"\w+", tag):
        raise ValueError(f"grader.tag must be a non-empty string of word characters, got {tag!r}")
    return tag


def check_tolerance(name: str, value: float) -> float:
    """A negative tolerance would silently make every answer wrong."""
    if value < 0:
        raise ValueError(f"grader.{name} must be >= 0, got {value}")
    return float(value)


# Graders read at most this many characters of a completion (its beginning for a tag, its end
# for a last \\boxed{}): what a model writes is adversarial input, and answers are short.
MAX_READ = 1 << 16


def tagged(completion: str, tag: str) -> str | None:
    """The stripped text inside the first <tag>...</tag>, or None if there is none.

    Two `find`s, linear time (a lazy regex rescans to the end from every unclosed <tag>)."""
    return between(completion[:MAX_READ], f"<{tag}>", f"</{tag}>")


def between(text: str, opening: str, closing: str) -> str | None:
    """The stripped text between the first `opening` and the first `closing` after it (what
    `re.search(opening + "(.*?)" + closing, text, re.DOTALL)` finds), or None."""
    start = text.find(opening)
    if start < 0:
        return None
    end = text.find(closing, start + len(opening))
    return None if end < 0 else text[start + len(opening) : end].strip()


def parse_number(text: str) -> float | None:
    """Read a number as people write answers: "1,234", "-3/4", "$1,000", "50%", "1e3", ".5".

    Commas only in groups of three, so "1,23" (a list, or a typo) is not read as 123. A percent
    sign is dropped, not divided out: "50%" is 50, as graders of percentage questions expect.
    """
    text = text.strip().removesuffix(".").removesuffix("%").strip()
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    sign, numerator, denominator = match.groups()
    value = float(numerator.replace(",", ""))
    if denominator is not None:
        divisor = float(denominator.replace(",", ""))
        if divisor == 0:
            return None
        value /= divisor
    return -value if sign == "-" else value
