"""Composition (rlkit.run.config): every recipe and every option composes and validates, a
swapped group shows its option's own values under every recipe, recipes select options only, a
reward list selects several, and every YAML field has a comment."""

import functools
import math

import pytest
from omegaconf import OmegaConf

from rlkit.run.config import CONF_DIR, compose, options
from rlkit.run.validate import validate

GROUPS = [
    "model",
    "adapter",
    "env",
    "grader",
    "advantage",
    "loss",
    "engine",
    "optim",
    "warmup",
    "logger",
    "determinism",
    "checkpoint",
]


@pytest.mark.parametrize("recipe", options("recipe"))
def test_every_recipe_composes_and_binds(recipe):
    cfg = compose([f"recipe={recipe}"])
    validate(cfg)
    assert cfg.model.base_model


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in GROUPS for o in options(g)] + [f"reward=[{o}]" for o in options("reward")],
)
def test_every_option_composes_and_binds(override):
    validate(compose(["recipe=pair_sum", override]))


def test_presets_compose_and_validate():
    for recipe in ("pair_sum_justrl", "pair_sum_lora_rl"):
        cfg = compose([f"recipe={recipe}"])
        validate(cfg)
    cfg = compose(["recipe=pair_sum_justrl"])
    assert OmegaConf.select(cfg, "loss.config.clip_high_threshold") == 1.28
    assert cfg.kl.coef == 0 and math.isclose(cfg.loss.config.clip_low_threshold, 0.8)


SWAPPED = ["warmup", "env", "model", "adapter", "loss"]


@functools.cache
def composed_alone(group: str, option: str) -> dict:
    """`GROUP=OPTION` composed without a recipe: the option's own values (composed once per
    session, then compared under every recipe)."""
    return OmegaConf.to_container(compose([f"{group}={option}"])[group], resolve=False)


def assert_swaps_show_their_own_options(recipe: str, swaps) -> None:
    for group, option in swaps:
        cfg = compose([f"recipe={recipe}", f"{group}={option}"])
        shown = OmegaConf.to_container(cfg[group], resolve=False)
        assert shown == composed_alone(group, option), (recipe, group, option)


def dealt(recipe: str) -> list[tuple[str, str]]:
    """The swapped groups' options dealt to the recipes in turn: each option is composed under
    one recipe (29 compositions, about 12 s on 2 cores)."""
    recipes = options("recipe")
    i = recipes.index(recipe)
    return [(g, o) for g in SWAPPED for j, o in enumerate(options(g)) if j % len(recipes) == i]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", options("recipe"))
def test_a_swapped_group_shows_its_own_options_defaults_under_every_recipe(recipe):
    """`recipe=R GROUP=OPTION` gives OPTION's own values, none of the recipe's: a recipe's
    settings for a group live in the option it selects (e.g. env/pair_sum_small.yaml), so
    `recipe=pair_sum warmup=none` has no warm start and `env=dataset` no pair_sum keys. Every
    option under one recipe here; every recipe with every option in `make test-all`, below."""
    assert_swaps_show_their_own_options(recipe, dealt(recipe))


# Exhaustive: every recipe with every option of each swapped group (8 x 29 compositions, 96 s on
# 2 cores). The cause it would catch, a recipe setting keys inside a group, is also checked
# statically below.
@pytest.mark.slow
@pytest.mark.full
@pytest.mark.parametrize("recipe", options("recipe"))
def test_every_recipe_with_every_option_of_a_swapped_group(recipe):
    assert_swaps_show_their_own_options(recipe, [(g, o) for g in SWAPPED for o in options(g)])


def test_recipes_set_no_key_inside_a_config_group():
    """What a recipe sets inside a group would survive a swap of that group; recipes select
    options (defaults) and set top-level keys only."""
    import yaml

    from rlkit.run.config import RECIPES_DIR

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for path in RECIPES_DIR.glob("*.yaml"):
        inside = groups & set(yaml.safe_load(path.read_text()))
        assert not inside, f"{path.name} sets keys inside the group(s) {sorted(inside)}"


def test_the_readme_command_without_a_warm_start_starts_rl_at_once():
    cfg = compose(["recipe=pair_sum", "model=qwen3_4b", "warmup=none"])
    assert cfg.warmup.steps == 0 and cfg.model.base_model == "Qwen/Qwen3-4B-Instruct-2507"
    cfg = compose(["recipe=pair_sum", "env=dataset", "env.path=data.jsonl"])
    assert "n_choices" not in cfg.env and cfg.env.path == "data.jsonl"


def test_every_field_has_a_comment_above_it():
    import re

    from rlkit.run.config import CONF_DIR, RECIPES_DIR

    missing = []
    for path in sorted([*CONF_DIR.rglob("*.yaml"), *RECIPES_DIR.glob("*.yaml")]):
        previous, block_indent = "", None
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            if block_indent is not None and indent > block_indent:
                continue  # the text of a `key: |` block scalar
            block_indent = indent if line.rstrip().endswith(("|", "|-", ">")) else None
            is_key = re.match(r"^\s*[\w.+-]+:", line) and not line.lstrip().startswith("defaults:")
            if is_key and not previous.lstrip().startswith("#"):
                missing.append(f"{path.relative_to(path.parents[1])}:{number} {line.strip()}")
            previous = line
    assert not missing, "fields without a comment above them:\n" + "\n".join(missing)


def test_reward_list_selects_several_options():
    cfg = compose(["recipe=pair_sum", "reward=[format,correct,concise]"])
    assert list(cfg.reward) == ["format", "correct", "concise"]
    assert cfg.reward.concise.max_chars == 64
    assert OmegaConf.select(cfg, "reward.format.weight") == 0.1
