"""Each loss against numbers computed by hand, plus the gradient and clipping properties."""

import math

import pytest
import torch

from rlkit.api import losses
from rlkit.api.errors import UnknownLossError

LP = torch.tensor([-1.0, -2.0, -0.5])  # learner logprobs
Q = torch.tensor([-1.0, -1.5, -1.0])  # sampler logprobs
A = torch.tensor([2.0, -1.0, 0.5])  # advantages


def total(name, logprobs=LP, **config):
    spec = losses.get_loss(name)
    inputs = {"logprobs": Q, "advantages": A}
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
        lp * a - 0.5 * beta * d for lp, a, d in zip([-1, -2, -0.5], A.tolist(), drift2, strict=True)
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
    # Token weights exp(LP - Q): 1.0, 0.61, 1.65. A cap of 1.2 bites on token 3 only.
    weights = [1.0, math.exp(-0.5), 1.2]
    expected = -sum(w * a for w, a in zip(weights, A.tolist(), strict=True))
    assert total("importance_sampling", tis_cap=1.2) == pytest.approx(expected)
    # A cap above every weight changes nothing.
    assert total("importance_sampling", tis_cap=10.0) == pytest.approx(total("importance_sampling"))


def test_truncated_importance_sampling_gradient_is_capped_weight_times_score():
    lp = LP.clone().double().requires_grad_(True)
    spec = losses.get_loss("importance_sampling")
    inputs = {"logprobs": Q.double(), "advantages": A.double()}
    spec.fn(lp, inputs, tis_cap=1.2).sum().backward()
    weight = torch.exp(LP - Q).double().clamp(max=1.2)
    # d/dlp of -w * exp(lp - sg(lp)) * A is -w * A (the ratio is 1 at the current policy).
    assert torch.allclose(lp.grad, -weight * A.double())
    # Uncapped tokens get exactly the plain IS gradient, -exp(lp - q) * A.
    plain = -torch.exp(LP - Q).double() * A.double()
    assert torch.allclose(lp.grad[:2], plain[:2]) and not torch.isclose(lp.grad[2], plain[2])


def test_ppo_with_tis_cap_weights_the_surrogate():
    # With tis_cap the ratio is to the old trainer policy (1 at the current one): no clipping,
    # so the loss is -min(w, cap) * A per token.
    weights = [1.0, math.exp(-0.5), 1.2]
    expected = -sum(w * a for w, a in zip(weights, A.tolist(), strict=True))
    assert total("ppo", tis_cap=1.2) == pytest.approx(expected)


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_negative_or_non_finite_config_values_are_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r"loss 'importance_sampling': loss_fn_config tis_cap="):
        losses.get_loss("importance_sampling").resolve_config(
            "importance_sampling", {"tis_cap": value}
        )
