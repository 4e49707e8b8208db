"""The algorithm options: each loss option's gradient against autograd of its hand-written
formula, the KL reference (adapter off) against a separately loaded base model, several updates
per batch, loss aggregation, overlong handling, and the bad combinations refused up front."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from rlkit.api import losses, types
from rlkit.api.errors import InvalidDatumError
from rlkit.rl.rollouts import Episode, Group, group_datums
from rlkit.rl.shaping import overlong_penalty
from rlkit.rl.update import aggregate, policy_update
from rlkit.run.config import compose
from rlkit.run.schema import ConfigError
from rlkit.run.validate import validate

torch.manual_seed(0)
N = 9
MASK = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0], dtype=torch.float64)  # prompt, model, env


def grads(name, lp, inputs, **config):
    spec = losses.get_loss(name)
    (g,) = torch.autograd.grad(spec.fn(lp, inputs, **spec.resolve_config(name, config)).sum(), lp)
    return g


def formula_grad(fn, lp):
    (g,) = torch.autograd.grad(fn(lp), lp)
    return g


def leaf(x):
    return x.clone().double().requires_grad_(True)


LP = torch.randn(N, dtype=torch.float64) - 1
Q = LP + 0.3 * torch.randn(N, dtype=torch.float64)  # sampler
REF = LP + 0.5 * torch.randn(N, dtype=torch.float64)  # base model
A = 1.5 * MASK  # one sequence, one advantage


@pytest.mark.parametrize("estimator", losses.KL_ESTIMATORS)
def test_kl_in_the_loss_is_autograd_of_its_formula(estimator):
    def k(lp):
        d = REF - lp
        return {
            "k1": -d,
            "k2": 0.5 * d**2,
            "k3": torch.exp(d) - 1 - d,
            "low_var_kl": (torch.exp(d.clamp(-20, 20)) - 1 - d.clamp(-20, 20)).clamp(-10, 10),
        }[estimator]

    coef = 0.3
    inputs = {"logprobs": Q, "advantages": A, "ref_logprobs": REF, "weights": MASK}
    got = grads("importance_sampling", leaf(LP), inputs, kl_coef=coef, kl_estimator=estimator)
    want = formula_grad(lambda lp: (MASK * (-torch.exp(lp - Q) * A + coef * k(lp))).sum(), leaf(LP))
    torch.testing.assert_close(got, want)
    # the estimates themselves, on the same numbers
    torch.testing.assert_close(losses.kl_penalty(LP, REF, estimator), k(LP))


def test_k3_is_nonnegative_and_zero_at_the_reference():
    assert (losses.kl_penalty(LP, REF, "k3") >= 0).all()
    assert losses.kl_penalty(LP, LP, "k3").abs().max() == 0


@pytest.mark.parametrize("spread", [1e-5, 0.3])  # inside the clip range, and far outside it
@pytest.mark.parametrize("adv", [1.5, -1.5])
def test_gspo_gradient_is_autograd_of_the_sequence_objective(spread, adv):
    old = LP + spread * torch.randn(N, dtype=torch.float64)
    n = MASK.sum()
    weights = MASK / n  # loss.aggregation=sequence_mean, one sequence
    inputs = {"logprobs": Q, "advantages": adv * MASK, "weights": weights, "old_logprobs": old}
    low, high = 1 - 3e-4, 1 + 4e-4

    def objective(lp):  # the paper's per-sequence term, as written there
        s = torch.exp(((lp - old) * MASK).sum() / n)
        return -torch.minimum(s * adv, s.clamp(low, high) * adv)

    got = grads("gspo", leaf(LP), inputs)
    torch.testing.assert_close(got, formula_grad(objective, leaf(LP)))
    value = losses.get_loss("gspo").fn(LP, inputs, **losses.get_loss("gspo").defaults).sum()
    torch.testing.assert_close(value, objective(LP))


def test_gspo_without_old_logprobs_uses_the_sampler_and_needs_weights():
    inputs = {"logprobs": Q, "advantages": A, "weights": MASK}
    n = MASK.sum()
    got = grads("gspo", leaf(LP), inputs, clip_low_threshold=0.0, clip_high_threshold=100.0)
    want = formula_grad(
        lambda lp: -(torch.exp(((lp - Q) * MASK).sum() / n) * 1.5) * n, leaf(LP)
    )  # weights 1: the sequence term counted once per token
    torch.testing.assert_close(got, want)
    assert "weights" in losses.get_loss("gspo").inputs


@pytest.mark.parametrize("clip", [(0.8, 1.2), (0.8, 1.28)])  # PPO, DAPO's clip-higher
def test_ppo_clip_higher_is_autograd_of_its_formula(clip):
    lp = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    q = lp - torch.log(torch.tensor([1.0, 1.25, 1.35, 0.7], dtype=torch.float64))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    low, high = clip
    got = grads(
        "ppo", leaf(lp), {"logprobs": q, "advantages": adv},
        clip_low_threshold=low, clip_high_threshold=high,
    )  # fmt: skip
    want = formula_grad(
        lambda x: (
            -torch.minimum(torch.exp(x - q) * adv, torch.exp(x - q).clamp(low, high) * adv).sum()
        ),
        leaf(lp),
    )
    torch.testing.assert_close(got, want)
    # ratio 1.25 with A > 0: clipped (no gradient) by PPO's 1.2, not by clip-higher's 1.28
    assert (got[1] == 0) == (high == 1.2)


@pytest.mark.parametrize(
    "name, tis_cap",
    [("ppo", 0.0), ("ppo", 1.1), ("importance_sampling", 0.0), ("importance_sampling", 1.1),
     ("cispo", 0.0)],
)  # fmt: skip
def test_old_logprobs_make_the_ratio_to_the_old_policy(name, tis_cap):
    old = LP + 0.2 * torch.randn(N, dtype=torch.float64)
    inputs = {"logprobs": Q, "advantages": A, "old_logprobs": old, "weights": MASK}
    config = {"tis_cap": tis_cap} if name != "cispo" else {}
    w = torch.exp(old - Q)
    w = w.clamp(max=tis_cap) if tis_cap else w

    def formula(lp):
        r = torch.exp(lp - old)
        if name == "importance_sampling":
            per = -w * r * A
        elif name == "ppo":
            per = -w * torch.minimum(r * A, r.clamp(0.8, 1.2) * A)
        else:
            per = -(r.clamp(0.8, 1.2) * w).detach() * lp * A
        return (MASK * per).sum()

    got = grads(name, leaf(LP), inputs, **config)
    torch.testing.assert_close(got, formula_grad(formula, leaf(LP)))


@pytest.mark.parametrize("name", ["importance_sampling", "ppo", "cispo"])
@pytest.mark.parametrize("with_old", [False, True])
def test_token_mask_is_autograd_of_its_formula(name, with_old):
    """IcePop: tokens whose behaviour ratio r = exp(old - sampler) leaves [low, high] carry no
    policy term; the others exactly the loss's own."""
    old = LP + 0.2 * torch.randn(N, dtype=torch.float64)
    inputs = {"logprobs": Q, "advantages": A, "weights": MASK}
    if with_old:
        inputs["old_logprobs"] = old
    r = torch.exp((old if with_old else LP) - Q)
    low, high = 0.8, 1.25
    keep = ((r >= low) & (r <= high)).double()
    assert 0 < float((keep * MASK).sum()) < float(MASK.sum())  # the mask bites, not everywhere
    spec = losses.get_loss(name)
    plain = spec.resolve_config(name, {})

    def formula(lp):
        return (keep * spec.fn(lp, inputs, **plain)).sum()

    got = grads(name, leaf(LP), inputs, token_mask_low=low, token_mask_high=high)
    torch.testing.assert_close(got, formula_grad(formula, leaf(LP)))


@pytest.mark.parametrize("with_old", [False, True])
def test_sequence_mask_drops_a_whole_sequence_outside_its_cap(with_old):
    """TRL's sequence masking: the sequence's ratio prod(r) over its model tokens; outside
    [1/C, C] the whole policy term is 0 (gradient 0), inside it is untouched."""
    old = LP + 0.2 * torch.randn(N, dtype=torch.float64)
    inputs = {"logprobs": Q, "advantages": A, "weights": MASK}
    if with_old:
        inputs["old_logprobs"] = old
    log_ratio = float((((old if with_old else LP) - Q) * MASK).sum())
    plain = grads("importance_sampling", leaf(LP), inputs)
    inside = math.exp(abs(log_ratio)) * 1.01  # C just above the sequence's ratio
    outside = math.exp(abs(log_ratio)) * 0.99
    assert outside > 1
    torch.testing.assert_close(
        grads("importance_sampling", leaf(LP), inputs, seq_mask_cap=inside), plain
    )
    masked = grads("importance_sampling", leaf(LP), inputs, seq_mask_cap=outside)
    assert torch.equal(masked, torch.zeros_like(masked))


def test_offpolicy_bounds_must_bracket_one():
    spec = losses.get_loss("importance_sampling")
    with pytest.raises(ValueError, match="seq_mask_cap=0.5 must be > 1"):
        spec.resolve_config("importance_sampling", {"seq_mask_cap": 0.5})
    with pytest.raises(ValueError, match="token_mask_low < 1 < token_mask_high"):
        spec.resolve_config("importance_sampling", {"token_mask_low": 1.2, "token_mask_high": 2})
    with pytest.raises(ValueError, match="token_mask_low < 1 < token_mask_high"):
        spec.resolve_config("importance_sampling", {"token_mask_low": 0.5})
    assert spec.resolve_config("importance_sampling", {"token_mask_high": 2})["token_mask_low"] == 0


def test_entropy_bonus_is_autograd_of_its_formula_through_the_logits():
    logits = torch.randn(N, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (N,))
    coef = 0.05

    def parts(z):
        logp = torch.log_softmax(z, -1)
        return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    lp, h = parts(logits)
    spec = losses.get_loss("ppo")
    inputs = {"logprobs": Q, "advantages": A, "weights": MASK, "entropy": h}
    config = spec.resolve_config("ppo", {"entropy_coef": coef})
    assert spec.needs_entropy(config)
    (got,) = torch.autograd.grad(spec.fn(lp, inputs, **config).sum(), logits)

    def formula(z):
        lp, h = parts(z)
        r = torch.exp(lp - Q)
        return (MASK * (-torch.minimum(r * A, r.clamp(0.8, 1.2) * A) - coef * h)).sum()

    (want,) = torch.autograd.grad(formula(logits), logits)
    torch.testing.assert_close(got, want)


def test_weights_scale_every_term_and_default_to_one():
    inputs = {"logprobs": Q, "advantages": A}
    plain = losses.get_loss("dro").fn(LP, inputs, beta=0.1)
    weighted = losses.get_loss("dro").fn(LP, {**inputs, "weights": MASK * 0.5}, beta=0.1)
    torch.testing.assert_close(weighted, plain * MASK * 0.5)


def test_policy_loss_options_are_validated_by_name():
    spec = losses.get_loss("ppo")
    with pytest.raises(ValueError, match="kl_estimator='k9' is not one of k1, k2, k3"):
        spec.resolve_config("ppo", {"kl_estimator": "k9"})
    with pytest.raises(ValueError, match="kl_coef=-0.1 must be a finite number >= 0"):
        spec.resolve_config("ppo", {"kl_coef": -0.1})
    assert spec.required_inputs(spec.resolve_config("ppo", {"kl_coef": 0.1})) >= {
        "ref_logprobs",
        "weights",
    }


def datum(n_prompt=2, n_model=3, with_ref=False):
    tokens = list(range(1, n_prompt + n_model + 1))
    inputs = {
        "target_tokens": tokens[1:],
        "logprobs": [0.0] * (n_prompt - 1) + [-1.0] * n_model,
        "advantages": [0.0] * (n_prompt - 1) + [1.0] * n_model,
        "weights": [0.0] * (n_prompt - 1) + [1.0] * n_model,
    }
    if with_ref:
        inputs["ref_logprobs"] = [-1.0] * len(tokens[1:])
    return types.Datum(types.ModelInput.from_ints(tokens[:-1]), inputs)


def test_kl_in_the_loss_without_reference_logprobs_is_named(trainer):
    with pytest.raises(InvalidDatumError, match=r"needs loss_fn_inputs \['ref_logprobs'\]"):
        trainer.forward_backward([datum()], "ppo", {"kl_coef": 0.1}).result()


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_sum", [[1, 1, 1], [1, 1, 1, 1, 1]]),
        ("token_mean", [[1 / 8] * 3, [1 / 8] * 5]),
        ("sequence_mean", [[1 / 6] * 3, [1 / 10] * 5]),
        ("constant", [[1 / 20] * 3, [1 / 20] * 5]),
    ],
)
def test_aggregation_weights(mode, expected):
    out = aggregate([datum(2, 3), datum(2, 5)], mode, max_tokens=10)
    for d, want in zip(out, expected, strict=True):
        w = d.loss_fn_inputs["weights"].to_torch()
        assert w[0] == 0  # the prompt stays out
        torch.testing.assert_close(w[1:], torch.tensor(want, dtype=torch.float32))


def test_truncated_episodes_can_be_masked_and_penalised():
    ep = Episode()
    ep.act(types.SampledSequence("length", [5, 6, 7], [-1.0, -1.0, -1.0]), tokenizer=_Bytes())
    assert ep.truncated
    group = Group(problem=None, prompt=[1, 2], episodes=[ep])
    (kept,) = group_datums(group, torch.tensor([1.0]))
    (masked,) = group_datums(group, torch.tensor([1.0]), mask_truncated=True)
    assert kept.loss_fn_inputs["weights"].to_torch().tolist() == [0, 1, 1, 1]
    assert masked.loss_fn_inputs["weights"].to_torch().tolist() == [0, 0, 0, 0]
    # DAPO's soft penalty: 0 until limit - buffer, then down to -1 at the limit
    assert [overlong_penalty(n, 40, 8) for n in (10, 32, 36, 40)] == [0.0, 0.0, -0.5, -1.0]


class _Bytes:
    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("latin-1")


def test_reference_logprobs_equal_a_separately_loaded_base_model(service, trainer):
    d = datum(3, 6)
    # move the adapter away from the base first: B starts at 0, so a fresh adapter is the base
    for _ in range(3):
        trainer.forward_backward([d], "ppo", None)
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    policy = trainer.forward([d], "ppo").result().loss_fn_outputs[0]["logprobs"].to_torch()
    (ref,) = trainer.compute_reference_logprobs([d]).result()
    base = service.create_sampling_client(base_model="rlkit-tiny")
    tokens = d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].to_torch()[-1].item()]
    from_copy = torch.tensor(base.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:])
    torch.testing.assert_close(ref.to_torch(), from_copy, atol=1e-5, rtol=0)
    assert (policy - from_copy).abs().max() > 1e-3  # the adapter does change the policy
    # the adapter is back on afterwards
    again = trainer.forward([d], "ppo").result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert torch.equal(again, policy)


def test_the_reference_can_be_a_saved_adapter_and_the_policy_is_left_untouched(service):
    """kl.reference=start: the KL reference is the adapter RL started from (the warm start's),
    swapped in for one forward pass; the policy's weights come back bitwise."""
    trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    d = datum(3, 6)

    def train(n):
        for _ in range(n):
            trainer.forward_backward([d], "ppo", None)
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    train(3)
    start = trainer.save_weights_for_sampler("start").result().path
    train(3)
    before = params(trainer)
    policy = trainer.forward([d], "ppo").result().loss_fn_outputs[0]["logprobs"].to_torch()
    trainer.set_reference(start).result()
    (ref,) = trainer.compute_reference_logprobs([d]).result()
    tokens = d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].to_torch()[-1].item()]
    saved = service.create_sampling_client(model_path=start)
    want = torch.tensor(saved.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:])
    torch.testing.assert_close(ref.to_torch(), want, atol=1e-5, rtol=0)
    assert (policy - want).abs().max() > 1e-3  # the three later steps did move the policy
    after = params(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = trainer.forward([d], "ppo").result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert torch.equal(again, policy)
    # None: the base model again
    trainer.set_reference(None).result()
    (base_ref,) = trainer.compute_reference_logprobs([d]).result()
    base = service.create_sampling_client(base_model="rlkit-tiny")
    from_base = torch.tensor(base.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:])
    torch.testing.assert_close(base_ref.to_torch(), from_base, atol=1e-5, rtol=0)


def test_a_reference_of_another_rank_is_refused(service):
    other = service.create_lora_training_client("rlkit-tiny", rank=2, seed=0)
    path = other.save_weights_for_sampler("r2").result().path
    trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    with pytest.raises(Exception, match="rank=2, but this client has .* rank=4"):
        trainer.set_reference(path).result()


def params(trainer):
    # Named as peft saves them (clients on one base have adapters of different names).
    name = f".{trainer._learner.adapter_name}."
    return {n.replace(name, "."): p.detach().clone() for n, p in trainer._learner.params.items()}


def test_one_update_per_batch_is_the_plain_step_bitwise(service):
    adam = types.AdamParams(learning_rate=1e-2)
    ds = [datum(2, 4), datum(3, 5)]
    a = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    a.forward_backward(ds, "ppo", None).result()
    a.optim_step(adam).result()
    b = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    out = policy_update(b, ds, "ppo", {}, adam, updates_per_batch=1, minibatches=1)
    assert out.optimizer_steps == 1
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_several_updates_use_the_old_logprobs_computed_once(service):
    adam = types.AdamParams(learning_rate=1e-2)
    ds = [datum(2, 4), datum(3, 5)]
    a = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    old = [o["logprobs"].to_torch() for o in a.forward(ds, "ppo").result().loss_fn_outputs]
    with_old = [
        types.Datum(d.model_input, {**d.loss_fn_inputs, "old_logprobs": o})
        for d, o in zip(ds, old, strict=True)
    ]
    for _ in range(3):
        a.forward_backward(with_old, "ppo", None).result()
        a.optim_step(adam).result()
    b = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    out = policy_update(b, ds, "ppo", {}, adam, updates_per_batch=3)
    assert out.optimizer_steps == 3
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # and minibatches split the batch: 2 x 2 optimizer steps
    c = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
    assert (
        policy_update(c, ds, "ppo", {}, adam, updates_per_batch=2, minibatches=2).optimizer_steps
        == 4
    )


def test_entropy_bonus_in_the_learner_matches_the_logits_formula(trainer):
    d = datum(3, 6)
    config = {"entropy_coef": 0.1}
    trainer.forward_backward([d], "importance_sampling", config).result()
    learner = trainer._learner
    got = {k: p.grad.clone() for k, p in learner.params.items() if p.grad is not None}
    learner.optimizer.zero_grad(set_to_none=True)
    learner.pending_datums = 0
    device = learner.device  # cpu, or RLKIT_TEST_DEVICE
    tokens = torch.tensor([d.model_input.to_ints()], device=device)
    targets = d.loss_fn_inputs["target_tokens"].to_torch().long().to(device)
    logits = learner.model(input_ids=tokens).logits.float()[0]
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(1, targets[:, None])[:, 0]
    h = -(logp.exp() * logp).sum(-1)
    inputs = {
        k: d.loss_fn_inputs[k].to_torch().float().to(device)
        for k in ("logprobs", "advantages", "weights")
    }
    per = -torch.exp(lp - inputs["logprobs"]) * inputs["advantages"] - 0.1 * h
    (per * inputs["weights"]).sum().backward()
    for k, g in got.items():
        torch.testing.assert_close(learner.params[k].grad, g, atol=1e-6, rtol=1e-5)


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


def test_an_unknown_estimator_fails_at_composition_naming_the_key():
    with pytest.raises(Exception, match=r"kl\.estimator"):
        compose(["kl.estimator=k9"])


def test_presets_compose_and_validate():
    for recipe in ("pair_sum_justrl", "pair_sum_lora_rl"):
        cfg = compose([f"recipe={recipe}"])
        validate(cfg)
    cfg = compose(["recipe=pair_sum_justrl"])
    assert OmegaConf.select(cfg, "loss.config.clip_high_threshold") == 1.28
    assert cfg.kl.coef == 0 and math.isclose(cfg.loss.config.clip_low_threshold, 0.8)
