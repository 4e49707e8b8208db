"""`python -m rlkit recipe=NAME [key=value ...]`: compose the config, validate it, train.

`python -m rlkit --help` lists the config groups, the recipes among them; `--cfg job` prints the
composed config without running.

Under a launcher (`accelerate launch --num_processes N -m rlkit recipe=NAME ...`, or torchrun),
the N processes join one group first; the main one's Hydra picks the run dir and the others
use it (they write nothing of Hydra's there).
"""

import os
import sys

# hydra/launcher=adapters runs every arm's model work in the main thread, with pauses between
# calls while an arm runs its own Python; OpenMP's worker threads must keep spinning through
# them, not sleep (measured, 4-arm pair_sum sweep on 2 CPU cores: 1.2x the wall time and 8x
# the context switches otherwise). Read once, when torch loads: before the imports below.
if "hydra/launcher=adapters" in sys.argv[1:]:
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlkit import client  # noqa: E402
from rlkit.api.errors import RlkitError  # noqa: E402
from rlkit.run import config, plugins  # noqa: E402
from rlkit.run.rundir import check_dir_path  # noqa: E402
from rlkit.run.schema import ConfigError  # noqa: E402
from rlkit.run.validate import validate  # noqa: E402

config.register()
plugins.register_entry_points()


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from rlkit.rl.loop import train

    procs = client.Launch.join()
    run_dir = HydraConfig.get().runtime.output_dir
    if procs.is_main:
        procs.broadcast(run_dir, "run dir")  # to the other processes, waiting in `run()`
    # A user's error (config, data, reward, model name, environment) is one line naming it;
    # anything else is a bug in rlkit and keeps its traceback.
    try:
        validate(cfg)
        train(cfg, run_dir)  # a used run dir is a ConfigError too
    except ConfigError as exc:
        if not procs.is_main:
            raise SystemExit(1) from None  # the main process reports the same error
        raise SystemExit(f"config error: {exc}") from None
    except RlkitError as exc:
        where = f"rank {procs.rank}: " if procs.world_size > 1 else ""
        raise SystemExit(f"error: {where}{exc}") from None
    except KeyboardInterrupt as exc:
        # A second Ctrl-C / SIGTERM (or a plugin raising KeyboardInterrupt): stop now, quietly;
        # the checkpoints on disk are complete (each is written atomically).
        if procs.is_main:
            print(interrupted(exc, run_dir, procs.world_size), file=sys.stderr)
        raise SystemExit(130) from None


def interrupted(exc: KeyboardInterrupt, run_dir: str, world_size: int) -> str:
    """The one message of a run stopped at once: why, the last complete checkpoint, and how to
    continue."""
    from rlkit.run.checkpoint import latest_checkpoint, resume_command

    why = str(exc) or "KeyboardInterrupt"
    last = latest_checkpoint(run_dir)
    kept = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
    return f"interrupted ({why}): {kept}. Continue with:\n  {resume_command(run_dir, world_size)}"


def run() -> None:
    for arg in sys.argv[1:]:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value:
            try:
                check_dir_path(key, value)
            except RlkitError as exc:
                raise SystemExit(f"error: {exc}") from None
    procs = client.Launch.join()  # a launcher's group; rank 0 of 1 without one
    if warning := client.Launch.lost_processes():
        print(warning, file=sys.stderr)
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
