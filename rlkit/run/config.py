"""Where a run's config comes from: the schema and the recipes registered with Hydra, YAML
composed from conf/ and recipes/ (`compose`, as `python -m rlkit` does), and the options of a
group. The schema is `rlkit.run.schema`, its checks `rlkit.run.validate`, and the building of
components from it `rlkit.run.build`."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlkit.run.schema import RunConfig

# Where the YAML lives: top-level conf/ and recipes/ in a source checkout; inside the package
# (rlkit/conf, rlkit/recipes) in an installed wheel, where the build copies them.
# The primary config file decides which, for both folders (a leftover empty rlkit/conf/ in an
# old checkout does not).
_PACKAGE = Path(__file__).resolve().parents[1]
_ROOT = _PACKAGE if (_PACKAGE / "conf" / "config.yaml").is_file() else _PACKAGE.parent
CONF_DIR = _ROOT / "conf"
RECIPES_DIR = _ROOT / "recipes"


def register() -> None:
    """The schema and the recipes (one YAML each in recipes/, the `recipe` group), into Hydra's
    config store; call before composing."""
    store = ConfigStore.instance()
    store.store(name="rlkit_schema", node=RunConfig)
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def compose(overrides: list[str] = ()) -> DictConfig:
    """The config `python -m rlkit OVERRIDES...` would run with (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlkit.run import plugins

    register()
    plugins.register_entry_points()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def checked(overrides: list[str] = ()) -> DictConfig:
    """`compose(overrides)`, validated as a run validates it; Hydra's own errors (an unknown
    group option, a bad override) as a ConfigError too: every mistake is one ConfigError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlkit.run.schema import ConfigError
    from rlkit.run.validate import validate

    try:
        cfg = compose(overrides)
        validate(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(str(exc).strip()) from None
    return cfg


def options(group: str) -> list[str]:
    """The built-in options of a config group (file names without .yaml)."""
    folder = RECIPES_DIR if group == "recipe" else CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))
