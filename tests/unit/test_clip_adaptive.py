"""Adaptive 3-sigma clipping rule (docs/optimizer.md, "Adaptive gradient clipping") on scripted grad norms."""

import math

import pytest

from mindspeed_mm_osp.optim.adaptive_clip import AdaptiveGradClip


def _expected(norms, gamma):
    """Straight transcription of the rule in docs/optimizer.md (with the skip fix) to compare against."""
    mu = var = None
    out = []
    for g in norms:
        if not math.isfinite(g):
            out.append(("skip", None))
            continue
        if mu is None:
            mu, var = min(3 * g, 1.0), 0.0
            out.append(("step", None))
            continue
        t = mu + 3 * math.sqrt(var)
        t_ext = max(mu + 5 * math.sqrt(var), 5.0)
        if g > t_ext:
            out.append(("skip", t))
        elif g > t:
            out.append(("clip", t))
        else:
            mu = gamma * mu + (1 - gamma) * g
            var = gamma * var + (1 - gamma) * (mu - g) ** 2
            out.append(("step", t))
    return out


def test_scripted_sequence_thresholds_and_coefficients():
    clip = AdaptiveGradClip(clip_grad=1.0, ema_decay=0.9)
    norms = [0.2, 0.3, 0.55, 0.4, 0.45, 0.5, 0.9, 7.0, float("nan"), 0.42, float("inf"), 0.41]
    decisions = [clip.decide(g) for g in norms]
    assert [d.action for d in decisions] == [a for a, _ in _expected(norms, 0.9)]
    # Step 1 sets mu = min(3*0.2, 1) = 0.6; step 2 threshold is exactly 0.6 (sigma 0) and 0.3 passes.
    assert decisions[0].reason == "first step"
    assert decisions[1].threshold == pytest.approx(0.6)
    mu2 = 0.9 * 0.6 + 0.1 * 0.3
    var2 = 0.1 * (mu2 - 0.3) ** 2
    assert decisions[2].threshold == pytest.approx(mu2 + 3 * math.sqrt(var2))
    for d, (_, t) in zip(decisions, _expected(norms, 0.9)):
        if t is not None and d.action != "skip":
            assert d.threshold == pytest.approx(t)
        if d.action == "clip":
            assert d.clip_coef == pytest.approx(d.grad_norm / d.threshold)
            assert d.scale == pytest.approx(1 / (d.clip_coef + 1e-6))
            assert d.grad_norm * d.scale == pytest.approx(d.threshold, rel=1e-5)
    assert decisions[7].action == "skip" and "extreme" in decisions[7].reason
    assert clip.total_skips == 3 and clip.consecutive_skips == 0


def test_clip_does_not_update_statistics_and_skips_count():
    clip = AdaptiveGradClip(ema_decay=0.99, max_consecutive_skips=2)
    clip.decide(0.1)
    clip.decide(0.1)
    before = (clip.mu, clip.var)
    assert clip.decide(0.5).action == "clip"  # 0.5 > T_clip, <= T_ext = 5
    assert (clip.mu, clip.var) == before
    assert clip.decide(float("nan")).action == "skip" and not clip.should_stop
    assert clip.decide(100.0).action == "skip" and clip.should_stop
    assert (clip.mu, clip.var) == before
    assert clip.decide(0.1).action == "step" and clip.consecutive_skips == 0


def test_constant_clip_rule():
    clip = AdaptiveGradClip(clip_grad=2.0, ema_decay=0.0)
    assert clip.decide(1.0).action == "step"
    d = clip.decide(4.0)
    assert d.action == "clip" and d.scale == pytest.approx(2.0 / (4.0 + 1e-6))
    assert clip.decide(float("inf")).action == "skip"
    assert AdaptiveGradClip(clip_grad=0.0, ema_decay=0.0).decide(1e9).action == "step"


def test_state_dict_round_trip():
    a = AdaptiveGradClip(ema_decay=0.95)
    for g in (0.3, 0.2, 0.25, 0.9):
        a.decide(g)
    b = AdaptiveGradClip(ema_decay=0.95)
    b.load_state_dict(a.state_dict())
    for g in (0.22, 0.6, 0.21):
        assert a.decide(g) == b.decide(g)
    assert a.state_dict() == b.state_dict()
