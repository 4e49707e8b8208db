"""The loss registry (rlkit.api.losses): each loss against numbers computed by hand; each
option's gradient against autograd of its hand-written formula (KL in the loss, GSPO, PPO's
clip-higher, the ratio to the old policy, token and sequence masks, the entropy bonus); clipping;
and unknown names, keys and values refused, through the registry and through a training client."""

import math

import pytest
import torch

from rlkit.api import losses
from rlkit.api.errors import UnknownLossError
from tests.helpers import plain_datum, plain_rl_datum

LP3 = torch.tensor([-1.0, -2.0, -0.5])  # learner logprobs
Q3 = torch.tensor([-1.0, -1.5, -1.0])  # sampler logprobs
A3 = torch.tensor([2.0, -1.0, 0.5])  # advantages


def total(name, logprobs=LP3, **config):
    spec = losses.get_loss(name)
    inputs = {"logprobs": Q3, "advantages": A3}
    if name == "cross_entropy":
        inputs = {"weights": torch.tensor([0.0, 1.0, 1.0])}
    return float(spec.fn(logprobs, inputs, **spec.resolve_config(name, config)).sum())


def test_cross_entropy_by_hand():
    # -(0*-1 + 1*-2 + 1*-0.5)
    assert total("cross_entropy") == pytest.approx(2.5)


def test_importance_sampling_by_hand():
    r = [1.0, math.exp(-0.5), math.exp(0.5)]
    expected = -(r[0] * 2.0 + r[1] * -1.0 + r[2] * 0.5)
    assert total("importance_sampling") == pytest.approx(expected)


def test_ppo_by_hand():
    r = [1.0, math.exp(-0.5), math.exp(0.5)]  # 1.0, 0.6065, 1.6487
    # token 2: A<0, ratio 0.61 < 0.8 -> min(0.61*-1, 0.8*-1) = -0.8
    # token 3: A>0, ratio 1.65 > 1.2 -> min(1.65*.5, 1.2*.5) = 0.6
    expected = -(r[0] * 2.0 + -0.8 + 0.6)
    assert total("ppo") == pytest.approx(expected)


def test_cispo_by_hand():
    # clip(ratio) * logprobs * A with ratios clipped to [0.8, 1.2]: 1.0, 0.8, 1.2
    expected = -(1.0 * -1.0 * 2.0 + 0.8 * -2.0 * -1.0 + 1.2 * -0.5 * 0.5)
    assert total("cispo") == pytest.approx(expected)


def test_dro_by_hand():
    beta = 0.1
    drift2 = [0.0, 0.25, 0.25]
    expected = -sum(
        lp * a - 0.5 * beta * d
        for lp, a, d in zip([-1, -2, -0.5], A3.tolist(), drift2, strict=True)
    )
    assert total("dro", beta=beta) == pytest.approx(expected)


def test_importance_sampling_gradient_matches_autograd_of_formula():
    torch.manual_seed(0)
    lp = torch.randn(7, dtype=torch.float64, requires_grad=True)
    q = torch.randn(7, dtype=torch.float64)
    adv = torch.randn(7, dtype=torch.float64)
    spec = losses.get_loss("importance_sampling")
    (g_registry,) = torch.autograd.grad(spec.fn(lp, {"logprobs": q, "advantages": adv}).sum(), lp)
    (g_formula,) = torch.autograd.grad(-(torch.exp(lp - q) * adv).sum(), lp)
    torch.testing.assert_close(g_registry, g_formula)
    # and the closed form: d/dlp of -exp(lp - q) * A is -exp(lp - q) * A
    torch.testing.assert_close(g_registry, -(torch.exp(lp - q) * adv).detach())


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_ppo_clipping_engages_exactly_outside_thresholds(adv_sign):
    low, high = 0.9, 1.1
    ratios = torch.tensor([0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15], dtype=torch.float64)
    q = torch.zeros_like(ratios)
    lp = torch.log(ratios).requires_grad_()
    adv = torch.full_like(ratios, adv_sign)
    spec = losses.get_loss("ppo")
    loss = spec.fn(
        lp, {"logprobs": q, "advantages": adv}, clip_low_threshold=low, clip_high_threshold=high
    )
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    # Gradient is zero exactly where the clipped branch is the minimum and the ratio is
    # outside [low, high]: above high for positive advantages, below low for negative ones.
    for r, g in zip(ratios.tolist(), grad.tolist(), strict=True):
        clipped = r > high if adv_sign > 0 else r < low
        if clipped:
            assert g == 0.0, (r, g)
        else:
            assert g == pytest.approx(-adv_sign * r), (r, g)


def test_unknown_loss_lists_known_ones():
    with pytest.raises(UnknownLossError, match="known losses: cispo, cross_entropy, dro"):
        losses.get_loss("crossentropy")


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown loss_fn_config keys \['clip_low'\]"):
        losses.get_loss("ppo").resolve_config("ppo", {"clip_low": 0.5})


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        losses.register_loss("ppo", inputs=())(lambda lp, inputs: lp)


def test_truncated_importance_sampling_caps_only_large_weights():
    # Token weights exp(LP3 - Q3): 1.0, 0.61, 1.65. A3 cap of 1.2 bites on token 3 only.
    weights = [1.0, math.exp(-0.5), 1.2]
    expected = -sum(w * a for w, a in zip(weights, A3.tolist(), strict=True))
    assert total("importance_sampling", tis_cap=1.2) == pytest.approx(expected)
    # A3 cap above every weight changes nothing.
    assert total("importance_sampling", tis_cap=10.0) == pytest.approx(total("importance_sampling"))


def test_truncated_importance_sampling_gradient_is_capped_weight_times_score():
    lp = LP3.clone().double().requires_grad_(True)
    spec = losses.get_loss("importance_sampling")
    inputs = {"logprobs": Q3.double(), "advantages": A3.double()}
    spec.fn(lp, inputs, tis_cap=1.2).sum().backward()
    weight = torch.exp(LP3 - Q3).double().clamp(max=1.2)
    # d/dlp of -w * exp(lp - sg(lp)) * A3 is -w * A3 (the ratio is 1 at the current policy).
    assert torch.allclose(lp.grad, -weight * A3.double())
    # Uncapped tokens get exactly the plain IS gradient, -exp(lp - q) * A3.
    plain = -torch.exp(LP3 - Q3).double() * A3.double()
    assert torch.allclose(lp.grad[:2], plain[:2]) and not torch.isclose(lp.grad[2], plain[2])


def test_ppo_with_tis_cap_weights_the_surrogate():
    # With tis_cap the ratio is to the old trainer policy (1 at the current one): no clipping,
    # so the loss is -min(w, cap) * A3 per token.
    weights = [1.0, math.exp(-0.5), 1.2]
    expected = -sum(w * a for w, a in zip(weights, A3.tolist(), strict=True))
    assert total("ppo", tis_cap=1.2) == pytest.approx(expected)


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_negative_or_non_finite_config_values_are_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r"loss 'importance_sampling': loss_fn_config tis_cap="):
        losses.get_loss("importance_sampling").resolve_config(
            "importance_sampling", {"tis_cap": value}
        )


def test_unknown_loss_lists_the_known_ones(trainer):
    with pytest.raises(
        UnknownLossError,
        match="known losses: cispo, cross_entropy, dro, gspo, importance_sampling, ppo",
    ):
        trainer.forward_backward([plain_datum()], "grpo").result()


def test_unknown_loss_config_key(trainer):
    with pytest.raises(ValueError, match=r"unknown loss_fn_config keys \['clip_ratio'\]"):
        trainer.forward_backward([plain_rl_datum()], "ppo", {"clip_ratio": 0.2}).result()


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
