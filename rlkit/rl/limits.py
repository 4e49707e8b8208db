"""Time limits on users' code: a reward, a grader or an environment step that hangs (a regex that
backtracks forever, a tool that never answers) must not hang the run.

`time_limit(seconds, what)` arms a real-time interval timer; when it fires, `TimeLimitExceeded`
is raised wherever the call is, including inside `re` matching, which checks for signals. It is
a BaseException so that a plugin's own `except Exception:` cannot swallow it; the caller turns
it into the plugin's error (`RewardError`, `EnvError`), which `on_reward_error` /
`on_env_error` then handle like any other failure. C code that never checks for signals cannot
be interrupted this way.

Timers are per process and signals reach only the main thread: off the main thread, or with
`seconds=0`, the call runs without a limit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TimeLimitExceeded(BaseException):
    """A call ran past its time limit (see `time_limit`)."""


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(_signum, _frame):
        raise TimeLimitExceeded(f"{what} did not return within plugin_timeout_s={seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
