"""What an environment plugin imports: `from rlkit.envs import Env, Grade, Problem`.

An environment makes problems, holds a held-out set, writes worked solutions and grades
completions (see `rlkit.rl.envs.base`). Importing this module does not import torch. The
built-in environments are in `rlkit/rl/envs/`, one file each.
"""

from rlkit.rl.envs.base import Env, Grade, Problem

__all__ = ["Env", "Grade", "Problem"]
