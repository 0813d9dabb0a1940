"""FusedEmaAdamW == torch.optim.AdamW followed by an explicit EMA of the updated weights."""

import copy

import pytest
import torch

from mindspeed_mm_osp.optim import EMA_KEY, FusedEmaAdamW, ema_decay_at, ema_state_dict


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5))


def _groups(model: torch.nn.Module, wd: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim == 1]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0, "lr": 3e-3}]


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 7, generator=g)
    return model(x).pow(2).mean()


def test_warmup_law_values():
    assert ema_decay_at(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay_at(10, 0.9999) == pytest.approx(0.55)
    assert ema_decay_at(100, 0.9999) == pytest.approx(101 / 110)
    assert ema_decay_at(89_990, 0.9999) == pytest.approx(0.9999)
    assert ema_decay_at(10**6, 0.9999) == 0.9999


@pytest.mark.parametrize("fused", [False, True])
def test_matches_adamw_plus_explicit_ema(fused: bool):
    ref_model, model = _model(), _model()
    ref_opt = torch.optim.AdamW(_groups(ref_model, 0.1), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = FusedEmaAdamW(_groups(model, 0.1), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                        ema_decay=0.9, fused=fused)
    ema = {p: p.detach().clone() for p in ref_model.parameters()}  # reference: EMA starts at the pre-update weights
    for step in range(1, 21):
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
        d = min(0.9, (1 + step) / (10 + step))
        for p in ref_model.parameters():
            ema[p].mul_(d).add_(p.detach(), alpha=1 - d)
    for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-6, msg=name)
        st = opt.state[p]
        torch.testing.assert_close(st["exp_avg"], ref_opt.state[p_ref]["exp_avg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(st["exp_avg_sq"], ref_opt.state[p_ref]["exp_avg_sq"], rtol=0, atol=1e-6)
        torch.testing.assert_close(st[EMA_KEY], ema[p_ref], rtol=0, atol=1e-6)
        assert st[EMA_KEY].dtype == torch.float32 and st[EMA_KEY].shape == p.shape
        assert float(st["step"]) == 20.0
    # Per-param step tensors, not shared.
    steps = [opt.state[p]["step"] for p in model.parameters()]
    assert len({id(s) for s in steps}) == len(steps)
    assert all(g["ema_decay"] == 0.9 for g in opt.param_groups)
    exported = ema_state_dict(model, opt)
    assert set(exported) == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(exported["0.weight"], ema[ref_model[0].weight], rtol=0, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    a = _model()
    opt_a = FusedEmaAdamW(a.parameters(), lr=1e-2, ema_decay=0.99, fused=False)
    for step in range(3):
        opt_a.zero_grad(); _loss(a, step).backward(); opt_a.step()
    b = copy.deepcopy(a)
    opt_b = FusedEmaAdamW(b.parameters(), lr=1e-2, ema_decay=0.5, fused=False)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["ema_decay"] == 0.99
    for step in range(3, 5):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad(); _loss(m, step).backward(); o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(opt_a.state[pa][EMA_KEY], opt_b.state[pb][EMA_KEY])


def test_rejects_non_fp32_params():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="fp32"):
        FusedEmaAdamW([p], fused=False).step()
