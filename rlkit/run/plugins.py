"""Rewards from installed packages: entry points in the group `rlkit.rl.rewards`.

A package that declares

    [project.entry-points."rlkit.rl.rewards"]
    my_reward = "my_pkg.rewards:my_reward"

makes `reward=[format,correct,my_reward]` work: each entry point becomes a config option in the
`reward` group with `_target_` set to it and weight 1.0 (override with `reward.my_reward.weight=`).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from hydra.core.config_store import ConfigStore

GROUP = "rlkit.rl.rewards"


def register_entry_points() -> list[str]:
    names = []
    store = ConfigStore.instance()
    for ep in entry_points(group=GROUP):
        target = ep.value.replace(":", ".")
        store.store(
            group="reward", name=ep.name, node={ep.name: {"_target_": target, "weight": 1.0}}
        )
        names.append(ep.name)
    return names
