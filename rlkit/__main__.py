"""`python -m rlkit recipe=NAME [key=value ...]`: compose the config, validate it, train.

`python -m rlkit --help` lists the config groups, the recipes among them; `--cfg job` prints the
composed config without running.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlkit.api.errors import RlkitError
from rlkit.run import config, plugins

config.register()
plugins.register_entry_points()


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from rlkit.rl.loop import train

    # A user's error (config, data, reward, model name, environment) is one line naming it;
    # anything else is a bug in rlkit and keeps its traceback.
    try:
        config.validate(cfg)
        train(cfg, HydraConfig.get().runtime.output_dir)  # a used run dir is a ConfigError too
    except config.ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    except RlkitError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
