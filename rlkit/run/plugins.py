"""Rewards and environments from installed packages: entry points in the groups
`rlkit.rewards` and `rlkit.envs`.

A package that declares

    [project.entry-points."rlkit.rewards"]
    my_reward = "my_pkg.rewards:my_reward"

    [project.entry-points."rlkit.envs"]
    my_env = "my_pkg.envs:MyEnv"

makes `reward=[format,correct,my_reward]` and `env=my_env` work: each entry point becomes a config
option, its `_target_` set to the entry point; a reward gets weight 1.0 (override with
`reward.my_reward.weight=`), an environment its class's defaults (override with `env.KEY=`).
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points

from hydra.core.config_store import ConfigStore

REWARDS = "rlkit.rewards"
ENVS = "rlkit.envs"


def register_entry_points() -> list[str]:
    """Registers every entry point of both groups; returns their names."""
    names = []
    store = ConfigStore.instance()
    for ep in entry_points(group=REWARDS):
        target = ep.value.replace(":", ".")
        store.store(
            group="reward", name=ep.name, node={ep.name: {"_target_": target, "weight": 1.0}}
        )
        names.append(ep.name)
    for ep in entry_points(group=ENVS):
        node = {"_target_": ep.value.replace(":", "."), **_defaults(ep)}
        store.store(group="env", name=ep.name, node=node)
        names.append(ep.name)
    return names


def _defaults(ep) -> dict:
    """The class's keyword defaults of plain types, so `env.KEY=` overrides them; none when it
    does not import (validation then names the error)."""
    try:
        params = inspect.signature(ep.load()).parameters.values()
    except Exception:
        return {}
    plain = (int, float, str, bool, list, tuple, type(None))
    return {
        p.name: list(p.default) if isinstance(p.default, tuple) else p.default
        for p in params
        if p.default is not p.empty and isinstance(p.default, plain)
    }
