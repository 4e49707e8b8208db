"""`python -m rlkit recipe=NAME [key=value ...]`: compose the config, validate it, train.

`python -m rlkit --help` lists the config groups, the recipes among them; `--cfg job` prints the
composed config without running.

Under a launcher (`accelerate launch --num_processes N -m rlkit recipe=NAME ...`, or torchrun),
the N processes join one group first; the main one's Hydra picks the run dir and the others
use it (they write nothing of Hydra's there).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlkit import client
from rlkit.api.errors import RlkitError
from rlkit.run import config, plugins

config.register()
plugins.register_entry_points()


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from rlkit.rl.loop import train

    procs = client.processes()
    run_dir = HydraConfig.get().runtime.output_dir
    if procs.is_main:
        procs.broadcast(run_dir, "run dir")  # to the other processes, waiting in `run()`
    # A user's error (config, data, reward, model name, environment) is one line naming it;
    # anything else is a bug in rlkit and keeps its traceback.
    try:
        config.validate(cfg)
        train(cfg, run_dir)  # a used run dir is a ConfigError too
    except config.ConfigError as exc:
        if not procs.is_main:
            raise SystemExit(1) from None  # the main process reports the same error
        raise SystemExit(f"config error: {exc}") from None
    except RlkitError as exc:
        where = f"rank {procs.rank}: " if procs.world_size > 1 else ""
        raise SystemExit(f"error: {where}{exc}") from None


def run() -> None:
    procs = client.processes()  # a launcher's group; rank 0 of 1 without one
    if procs.world_size > 1:
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            raise SystemExit(
                "error: a sweep (-m) cannot run under a launcher: launch each run on its own"
            )
        if not procs.is_main:
            run_dir = procs.broadcast(what="run dir")
            kept = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
            sys.argv[1:] = [
                *kept,
                f"hydra.run.dir={run_dir}",
                "hydra.output_subdir=null",  # .hydra/ is the main process's
                "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled",
            ]
    main()


if __name__ == "__main__":
    run()
