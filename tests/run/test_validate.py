"""Everything checked before a model loads (rlkit.run.validate): bad keys, values and
combinations fail naming the key (ranges, the device, the loss's and the engine's options,
quantization, every component's arguments against its annotations)."""

import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from rlkit.api import losses
from rlkit.run.config import compose
from rlkit.run.schema import ConfigError
from rlkit.run.validate import validate
from tests.helpers import requires_bitsandbytes

TINY = ["recipe=pair_sum", "model=rlkit_tiny"]


def config_error(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose([*TINY, *overrides]))
    return str(info.value)


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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["kl.coef=-0.1"], "kl.coef must be a finite number >= 0, got -0.1"),
        (["kl.coef=inf"], "kl.coef must be a finite number"),
        (["loss.entropy_coef=-1"], "loss.entropy_coef must be a finite number >= 0"),
        (["kl.coef=0.1", "kl.estimator=k1"], "kl.estimator=k1 with kl.placement=loss"),
        (["loss=gspo", "loss.aggregation=token_sum"], "loss=gspo with loss.aggregation=token_sum"),
        (["minibatches=1000"], "minibatches=1000 exceeds the batch"),
        (["updates_per_batch=0"], "updates_per_batch must be >= 1"),
        (
            ["overlong.mode=penalty", "overlong.buffer=100"],
            "overlong.buffer=100 exceeds max_tokens",
        ),
        (["loss=ppo", "loss.config.clip_high_threshold=0.9"], "clip_low_threshold <= 1 <="),
        (["+loss.config.seq_mask_cap=0.9"], "seq_mask_cap=0.9 must be > 1"),
        (["max_steps_off_policy=-1"], "max_steps_off_policy must be >= 0, got -1"),
        (["max_steps_off_policy=1000"], "max_steps_off_policy=1000 exceeds steps"),
    ],
)
def test_bad_option_values_and_combinations_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(compose(["recipe=pair_sum", *overrides]))


def test_group_size_one_is_refused_naming_the_key():
    assert "group_size must be >= 2, got 1" in config_error("group_size=1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_cpu_build_names_model_device():
    message = config_error("model.device=cuda")
    assert message.startswith("model.device=cuda, but torch") and "use model.device=cpu" in message
    assert "model.device=cuda:3" in config_error("model.device=cuda:3")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("env.high=abc", "env.high='abc' must be int (the high argument of"),
        ("env.n_choices=[2,x]", "env.n_choices=[2, 'x'] must be a list of int"),
        ("env.system_prompt=3", "env.system_prompt=3 must be str"),
        ("+reward.concise.max_chars=1.5", "reward.concise.max_chars=1.5 must be int"),
    ],
)
def test_component_arguments_are_checked_against_their_annotations(override, message):
    extra = ["reward=[format,correct,concise]"] if "concise" in override else []
    assert message in config_error(*extra, override.lstrip("+"))


def test_an_inverted_clip_range_is_refused_in_the_config_and_the_api():
    message = config_error("loss=ppo", "loss.config.clip_low_threshold=2")
    assert "clip_low_threshold <= 1 <= clip_high_threshold" in message and "2.0 and 1.2" in message
    with pytest.raises(ValueError, match="clip_low_threshold <= 1 <= clip_high_threshold"):
        losses.get_loss("cispo").resolve_config("cispo", {"clip_high_threshold": 0.9})


@requires_bitsandbytes
@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        (["model.quantize=int8", "adapter=dora"], "adapter.use_dora", "int8 with a DoRA"),
        (
            ["model.quantize=int8", "model.quant_compute_dtype=float32"],
            "model.quant_compute_dtype",
            "int8 layers compute in float16",
        ),
    ],
)
def test_impossible_quantization_fails_before_training_naming_the_key(overrides, key, reason):
    cfg = compose(["recipe=pair_sum", "model=rlkit_tiny", *overrides])
    with pytest.raises(ConfigError, match=rf"^{key}=.*{reason}"):
        validate(cfg)


@requires_bitsandbytes
def test_missing_bitsandbytes_names_the_key_and_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # fault injection: import fails
    cfg = compose(["recipe=pair_sum", "model=rlkit_tiny", "model.quantize=nf4"])
    with pytest.raises(ConfigError, match=r"^model.quantize=nf4 .*rlkit\[quant\]"):
        validate(cfg)
