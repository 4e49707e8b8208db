"""`hydra/launcher=adapters`: a sweep's arms trained together as adapters on one base model.

Hydra's side only (its plugin and its config, `hydra.launcher.arms`); what runs is
rlkit.run.arms, whose docstring tells the whole story.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class AdaptersLauncherConf:
    _target_: str = "hydra_plugins.rlkit_launcher.adapters.AdaptersLauncher"
    # Arms trained at once on one copy of the base model (the rest wait for a group's end).
    arms: int = 4
    # true: the arms' forward / forward_backward calls run as one pass and their samples as one
    # decode, each row through its arm's adapter (each arm then equals its own run to float
    # rounding, the same bits in every rerun of the sweep); false: the calls take turns, each
    # arm bitwise its run under the basic launcher. Off by default: on 2 CPU cores it saves
    # little wall time for more memory (benchmarks/README.md); one batch pays where one arm's
    # calls leave the device idle (a GPU).
    batch: bool = False


ConfigStore.instance().store(
    group="hydra/launcher", name="adapters", node=AdaptersLauncherConf, provider="rlkit"
)


class AdaptersLauncher(Launcher):
    def __init__(self, arms: int = 4, batch: bool = False) -> None:
        from rlkit.run.arms import SweepError, check_arms, check_batch

        try:
            self.arms = check_arms(arms)
            self.batch = check_batch(batch)
        except SweepError as exc:
            raise SystemExit(f"error: {exc}") from None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from rlkit.rl.loop import train
        from rlkit.run import arms
        from rlkit.run.schema import ConfigError
        from rlkit.run.validate import validate

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_configs, names = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
            sweep_configs.append(sweep_config)
            names.append(" ".join(filter_overrides(overrides)) or f"#{idx}")
        # Everything checked before anything runs: one line naming the arm and the key.
        try:
            arms.check_shared(sweep_configs, names)
            for sweep_config, name in zip(sweep_configs, names, strict=True):
                task = sweep_config.copy()
                with open_dict(task):
                    del task["hydra"]
                try:
                    validate(task)
                except ConfigError as exc:
                    raise arms.SweepError(f"arm {name!r}: {exc}") from None
        except arms.SweepError as exc:
            raise SystemExit(f"error: {exc}") from None

        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Training {len(job_overrides)} arms, {self.arms} at a time, on one base model")
        # Hydra's own job setup for each arm (run dir, .hydra/ files), with a task that only
        # records where; the arms then train together.
        jobs: list[arms.Job] = []
        returns: list[JobReturn] = []
        for sweep_config, name in zip(sweep_configs, names, strict=True):

            def record(cfg: DictConfig, name: str = name) -> None:
                run_dir = Path(HydraConfig.get().runtime.output_dir)
                jobs.append(arms.Job(cfg, run_dir, name))

            returns.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=record,
                    config=sweep_config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        arms.train_arms(jobs, self.arms, train, self.batch)
        failed = [job for job in jobs if job.outcome not in ("done", "stopped")]
        for ret, job in zip(returns, jobs, strict=True):
            ret.return_value = job.summary
            if job in failed:
                ret.status = JobStatus.FAILED
        if failed:
            raise SystemExit(
                "error: "
                + "; ".join(f"arm {job.run_dir.name} ({job.name}): {job.outcome}" for job in failed)
            )
        if any(job.outcome == "stopped" for job in jobs):
            arms.print_resume(str(self.config.hydra.sweep.dir))
            raise SystemExit(0)
        return returns
