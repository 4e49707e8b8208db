"""Every config option composes and binds; bad configs fail before any model loads."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from rlkit.run.config import CONF_DIR, compose, options
from rlkit.run.schema import ConfigError
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


SWAPPED = ["warmup", "env", "model", "adapter", "loss"]


@pytest.mark.parametrize("recipe", options("recipe"))
def test_a_swapped_group_shows_its_own_options_defaults_under_every_recipe(recipe):
    """`recipe=R GROUP=OPTION` gives OPTION's own values, none of the recipe's: a recipe's
    settings for a group live in the option it selects (e.g. env/pair_sum_small.yaml), so
    `recipe=pair_sum warmup=none` has no warm start and `env=dataset` no pair_sum keys."""
    for group in SWAPPED:
        for option in options(group):
            cfg = compose([f"recipe={recipe}", f"{group}={option}"])
            alone = compose([f"{group}={option}"])
            shown = OmegaConf.to_container(cfg[group], resolve=False)
            assert shown == OmegaConf.to_container(alone[group], resolve=False), (group, option)


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


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["optim.lrr=1"], ConfigCompositionException, "optim.lrr"),
        (["+optim.lrr=1"], ConfigError, "unknown key 'optim.lrr'; optim has: lr,"),
        (["+stepz=3"], ConfigError, "unknown key 'stepz'"),
        (["optim.lr=abc"], ConfigCompositionException, "optim.lr=abc"),
        (["reward=nonexistent"], MissingConfigException, "reward/nonexistent"),
        (["group_size=0"], ConfigError, "group_size must be >= 1, got 0"),
        (["stop=['']"], ConfigError, "stop must be a list of non-empty strings"),
        (
            ["optim.schedule=cosine"],
            ConfigCompositionException,
            r"expected one of \[constant, linear\][\s\S]*full_key: optim.schedule",
        ),
        (["optim.beta2=1.5"], ConfigError, r"optim.beta2 must be in \[0, 1\)"),
        (["temperature=-1"], ConfigError, "temperature must be a finite number >= 0"),
        (["temperature=nan"], ConfigError, "temperature must be a finite number >= 0, got nan"),
        (["eval_temperature=nan"], ConfigError, "eval_temperature must be a finite number >= 0"),
        (["optim.lr=inf"], ConfigError, "optim.lr must be a finite number >= 0, got inf"),
        (["seed=1180591620717411303424"], ConfigError, r"seed must be in \[0, 2\*\*63 - 1\]"),
        (["temperature=0"], ConfigError, "temperature=0: rollouts would be greedy"),
        (["loss.name=nope"], ConfigError, "unknown loss_fn 'nope'; known losses: cispo"),
        (["loss.name=cross_entropy"], ConfigError, "not a policy-gradient loss"),
        (["loss.config.tis_cap=-1"], ConfigError, r"loss_fn_config tis_cap=-1.0 must be"),
        (
            ["loss=ppo", "+loss.config.clip=0.1"],
            ConfigError,
            r"unknown loss_fn_config keys \['clip'\]",
        ),
        (
            ["+env.hgh=3"],
            ConfigError,
            "env: rlkit.rl.envs.pair_sum.PairSumEnv got an unexpected keyword argument 'hgh'",
        ),
        (
            ["+reward.mine._target_=no.such.module.fn"],
            ConfigError,
            "cannot import 'no.such.module.fn'",
        ),
        (
            ["advantage._target_=rlkit.rl.advantages.nope"],
            ConfigError,
            "cannot import 'rlkit.rl.advantages.nope'",
        ),
        (
            ["model.dtype=float64"],
            ConfigCompositionException,
            r"expected one of \[auto, float32, bfloat16, float16\][\s\S]*full_key: model.dtype",
        ),
        (["model.device=gpu"], ConfigError, "model.device must be auto, cpu, mps, cuda or cuda:N"),
        (
            ["on_reward_error=ignore"],
            ConfigCompositionException,
            r"expected one of \[raise, skip\][\s\S]*full_key: on_reward_error",
        ),
        (
            ["resume=yes"],
            ConfigCompositionException,
            r"expected one of \[never, auto\][\s\S]*full_key: resume",
        ),
        (["recipe=nope"], MissingConfigException, "recipe/nope"),
        (
            ["+engine.kv_cache_gbi=1"],
            ConfigError,
            "unknown engine.kv_cache_gbi for engine 'hf'; known: probe_tolerance, batch_rows$",
        ),
        (
            ["engine=vllm", "engine.gpu_memory_utilization=2"],
            ConfigError,
            r"engine.gpu_memory_utilization must be in \(0, 1\], got 2",
        ),
        (["engine=vllm", "engine.max_num_seqs=0"], ConfigError, "engine.max_num_seqs must be >= 1"),
        (
            ["engine=vllm", "engine.max_num_seqs=abc"],
            ConfigError,
            "engine.max_num_seqs='abc' must be int",
        ),
        (
            ["engine.probe_tolerance=abc"],
            ConfigError,
            "engine.probe_tolerance='abc' must be a number",
        ),
        (["engine.probe_tolerance=0"], ConfigError, "engine.probe_tolerance must be > 0"),
        (["engine._target_=no.such.Engine"], ConfigError, "cannot import engine 'no.such.Engine'"),
        (["determinism.cublas_workspace=4096"], ConfigError, "must look like ':4096:8'"),
        (
            ["determinism.num_threads=-1"],
            ConfigError,
            "determinism.num_threads must be a finite number >= 0",
        ),
        (["checkpoint.keep_last=0"], ConfigError, "checkpoint.keep_last must be >= 1"),
        (["+checkpoint.evry=3"], ConfigError, "unknown key 'checkpoint.evry'"),
    ],
)
def test_bad_configs_fail_naming_the_key(overrides, error, message):
    with pytest.raises(error) as info:
        validate(compose(["recipe=pair_sum", *overrides]))
    text = str(info.value) + str(info.value.__cause__ or "")
    import re

    assert re.search(message, text), text


def test_type_errors_name_the_full_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["optim.lr=abc"])
    assert "full_key: optim.lr" in str(info.value.__cause__)


def test_reward_list_selects_several_options():
    cfg = compose(["recipe=pair_sum", "reward=[format,correct,concise]"])
    assert list(cfg.reward) == ["format", "correct", "concise"]
    assert cfg.reward.concise.max_chars == 64
    assert OmegaConf.select(cfg, "reward.format.weight") == 0.1


def test_optimizer_and_adapter_settings_are_declared_once():
    """optim.* and adapter.* are the API's AdamParams and AdapterSpec fields, renamed where the
    config says so, and turn back into them without a field-by-field copy."""
    import dataclasses

    from rlkit.api.adapter import AdapterSpec
    from rlkit.api.types import AdamParams
    from rlkit.run.build import adam_params, adapter_args
    from rlkit.run.schema import AdapterConfig, OptimConfig

    optim_keys = [f.name for f in dataclasses.fields(OptimConfig)]
    assert optim_keys == ["lr", *[f.name for f in dataclasses.fields(AdamParams)][1:], "schedule"]
    adapter_keys = [f.name for f in dataclasses.fields(AdapterConfig)]
    assert adapter_keys == [f.name for f in dataclasses.fields(AdapterSpec) if f.name != "seed"]

    cfg = compose(["recipe=pair_sum", "optim.lr=0.25", "optim.eps=1e-6", "adapter.alpha=8"])
    assert adam_params(cfg.optim) == AdamParams(
        learning_rate=0.25, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0, grad_clip_norm=1.0
    )
    args = adapter_args(cfg.adapter)
    assert args["lora_alpha"] == 8 and "alpha" not in args and args["rank"] == cfg.adapter.rank
