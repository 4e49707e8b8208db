"""Which policy samples which step: asynchronous RL with bounded staleness, reproducible.

Policy v is the adapter after v RL optimizer steps (0: the one RL starts from). With
`max_steps_off_policy=K` the rollouts of step s are sampled by policy `version(s) = max(0, s-K)`:
as soon as policy v exists, the rollouts it samples (step v + K; steps 0 .. K for policy 0) run
in a background thread while the steps before them train. Which policy samples which step, and
with which problems and seeds, is a function of the step alone, never of the clock, so two runs
of one config give the same bits however the sampling and the training interleave; running a
step's sampling in the background or on the spot gives the same rollouts.

K = 0 is the synchronous loop: each step is sampled on the spot by the current policy.

A checkpoint holds the policies the next K steps are sampled by (`Session.keep_policy`); on
resume they sample those steps again, with the same seeds: the same rollouts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass


def slow(phase: str) -> None:
    """Test hook: RLKIT_SLOW=sampling:SECONDS (or training:SECONDS) sleeps that long in every
    step's sampling (training), to show that timing does not change a run's bits."""
    name, _, seconds = os.environ.get("RLKIT_SLOW", "").partition(":")
    if name == phase:
        time.sleep(float(seconds))


@dataclass
class Sampled:
    """A step's rollouts, the policy that sampled them, and when the sampling ran."""

    rollouts: object
    version: int
    seconds: float  # the sampling itself
    waited: float = 0.0  # how long the loop waited for it


class Schedule:
    """The rollouts of each RL step, from the policy `version(step)`. `sample(sampler, step)`
    makes a step's rollouts; `add(version, sampler)` hands over each new policy; `take(step)`
    returns a step's rollouts, waiting for them if they are still being sampled."""

    def __init__(
        self, k: int, first: int, steps: int, sample: Callable[[object, int], object]
    ) -> None:
        self.k, self.first, self.steps = k, first, steps
        self._sample = sample
        self._samplers: dict[int, object] = {}
        self._jobs: dict[int, Future] = {}
        # One thread: the steps are sampled in order, one at a time, whatever the timing.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if k else None

    def version(self, step: int) -> int:
        return max(0, step - self.k)

    def needed(self, step: int) -> range:
        """The policies older than step `step` that steps step .. step+K-1 are sampled by."""
        return range(self.version(step), step)

    def add(self, version: int, sampler) -> None:
        """Policy `version` exists: start sampling the steps it samples."""
        self._samplers[version] = sampler
        if self._pool is None:
            return
        for step in range(self.first, self.steps):
            if self.version(step) == version and step not in self._jobs:
                self._jobs[step] = self._pool.submit(self._timed, sampler, step)

    def take(self, step: int) -> Sampled:
        t = time.perf_counter()
        job = self._jobs.pop(step, None)
        # K = 0 (or a step not started in the background): sampled here and now.
        out = self._timed(self._samplers[self.version(step)], step) if job is None else job.result()
        out.waited = time.perf_counter() - t
        for old in [v for v in self._samplers if v < self.version(step + 1)]:
            del self._samplers[old]  # no later step is sampled by it
        return out

    def _timed(self, sampler, step: int) -> Sampled:
        t = time.perf_counter()
        slow("sampling")
        rollouts = self._sample(sampler, step)
        return Sampled(rollouts, self.version(step), time.perf_counter() - t)

    def close(self) -> None:
        """Stop: no new step starts; one already running finishes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
