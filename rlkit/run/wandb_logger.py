"""logger=wandb: Weights & Biases as an extra metric sink."""

from __future__ import annotations

import os
from pathlib import Path

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
    ) -> None:
        import wandb

        if mode not in ("auto", "online", "offline"):
            raise ValueError(f"logger.mode must be auto, online or offline; got {mode!r}")
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.mode = mode
        self._run = wandb.init(
            project=project, entity=entity, mode=mode, dir=str(run_dir), config=run_config
        )
        if mode == "offline":
            console.print(
                f"wandb: offline (no WANDB_API_KEY); files in {self._run.dir} "
                f"- upload later with `wandb sync {Path(self._run.dir).parent}`"
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()
