"""What an environment plugin imports: `from rlkit.envs import Env, Grade, Problem`.

An environment makes problems, holds a held-out set, writes worked solutions, grades completions
and, for multi-turn tasks, answers each model turn (see `rlkit.rl.envs.base`). Importing this
module does not import torch. The built-in environments are in `rlkit/rl/envs/`, one file each;
graders (`grader(completion, reference) -> Grade`) in `rlkit/rl/graders/`.
"""

from rlkit.rl.envs.base import Env, EnvError, Grade, Problem

__all__ = ["Env", "EnvError", "Grade", "Problem"]
