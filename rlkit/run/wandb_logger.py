"""logger=wandb: Weights & Biases as an extra metric sink."""

from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape

from rlkit.run.outputs import console


class WandbLogger:
    """Weights & Biases sink. Without WANDB_API_KEY (or with mode=offline) it runs offline and
    says where the files went. The key is read by wandb from the environment, never written."""

    def __init__(
        self,
        run_dir: str,
        run_config: dict,
        project: str = "rlkit",
        entity: str | None = None,
        mode: str = "auto",
        init_timeout: float = 30.0,
    ) -> None:
        import wandb

        if mode not in ("auto", "online", "offline"):
            raise ValueError(f"logger.mode must be auto, online or offline; got {mode!r}")
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        args = {"project": project, "entity": entity, "dir": str(run_dir), "config": run_config}
        reason = "no WANDB_API_KEY"
        if mode == "online":
            try:
                self._run = wandb.init(
                    **args, mode=mode, settings=wandb.Settings(init_timeout=init_timeout)
                )
            except Exception as exc:  # unreachable, a bad key, ...: the run goes on offline
                first = (str(exc).strip().splitlines() or [""])[0]
                reason = f"online start failed: {type(exc).__name__}: {first}"
                mode = "offline"
        self.mode = mode
        if mode == "offline":
            self._run = wandb.init(**args, mode="offline")
            console.print(
                f"wandb: offline ({escape(reason)}); files in {self._run.dir} "
                f"- upload later with `wandb sync {Path(self._run.dir).parent}`",
                soft_wrap=True,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()
