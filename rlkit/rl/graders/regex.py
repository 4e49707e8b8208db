"""Regex: the answer is a capture group of a pattern, for output formats the other graders miss."""

from __future__ import annotations

import re

from rlkit.rl.envs.base import Grade


class Regex:
    """The first match's `group` is the answer; it must equal the reference, stripped.

    `ignore_case` applies both to matching and to the comparison. No flags are added behind the
    pattern's back: write `(?s)` for `.` to span lines.
    """

    def __init__(self, pattern: str, group: int = 1, ignore_case: bool = False) -> None:
        try:
            self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except (re.error, TypeError) as exc:
            raise ValueError(f"grader.pattern {pattern!r} does not compile: {exc}") from None
        if not 0 <= group <= self.regex.groups:
            raise ValueError(
                f"grader.group must be between 0 and {self.regex.groups} (the groups in "
                f"grader.pattern), got {group}"
            )
        self.group, self.ignore_case = group, ignore_case

    def _normalize(self, text: str) -> str:
        text = text.strip()
        return text.casefold() if self.ignore_case else text

    def __call__(self, completion: str, reference: str) -> Grade:
        match = self.regex.search(completion)
        if match is None:
            return Grade(correct=False, formatted=False)
        answer = match.group(self.group) or ""  # an optional group that did not take part
        return Grade(correct=self._normalize(answer) == self._normalize(reference), formatted=True)
