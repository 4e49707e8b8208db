"""Exact match: the tagged answer equals the reference, up to whitespace (and case, optionally)."""

from __future__ import annotations

from rlkit.rl.envs.base import Grade
from rlkit.rl.graders.base import check_tag, tagged


class ExactMatch:
    """For answers that are words or labels (a choice letter, a name), where only the text counts."""

    def __init__(self, tag: str = "answer", case_sensitive: bool = True) -> None:
        self.tag = check_tag(tag)
        self.case_sensitive = case_sensitive

    def _normalize(self, text: str) -> str:
        text = " ".join(text.split())
        return text if self.case_sensitive else text.lower()

    def __call__(self, completion: str, reference: str) -> Grade:
        answer = tagged(completion, self.tag)
        if answer is None:
            return Grade(correct=False, formatted=False)
        return Grade(correct=self._normalize(answer) == self._normalize(reference), formatted=True)
