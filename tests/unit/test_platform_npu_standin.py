"""The Ascend branch of `platform/`, run here with stand-in `torch_npu` and `mindspeed` packages (no CANN).

The stand-ins are real packages written to a temporary folder on `sys.path`, so the platform finds and imports
them exactly as it would the real ones. They record how they are called and compute what the real kernels are
documented to compute (`npu_fusion_attention`: masked softmax attention, True = masked; MindSpeed's
`npu_apply_fused_ema_adamw(grad, var, m, v, s, step, lr, ema_decay, beta1, beta2, eps, mode, bias_correction,
weight_decay)`, as in docs/optimizer.md). Passing proves the wiring: device selection, the backend names,
MindSpeed's megatron adaptor being imported, the attention call (layout, head count, scale, mask polarity) and the
fused optimizer selection with its argument order. Not proven: the real kernels' numerics (needs an Ascend
device; see README "What is verified where").
"""

import math
import sys
import textwrap

import pytest
import torch

from mindspeed_mm_osp import platform

TORCH_NPU = '''
import types
import torch

CALLS = []

def npu_fusion_attention(query, key, value, head_num, input_layout, atten_mask=None, scale=1.0, keep_prob=1.0):
    CALLS.append(dict(head_num=head_num, input_layout=input_layout, scale=scale, keep_prob=keep_prob,
                      mask_shape=None if atten_mask is None else tuple(atten_mask.shape),
                      mask_dtype=None if atten_mask is None else atten_mask.dtype, q_shape=tuple(query.shape)))
    assert input_layout == "BNSD" and query.shape[1] == head_num
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if atten_mask is not None:
        scores = scores.masked_fill(atten_mask, torch.finfo(torch.float32).min)
    out = (scores.softmax(-1) @ value.float()).to(query.dtype)
    return out, None, None, None, None, None, None

class _Npu(types.SimpleNamespace):
    pass

torch.npu = _Npu(is_available=lambda: True, current_device=lambda: 0, set_device=lambda i: None,
                 synchronize=lambda: None, empty_cache=lambda: None, device_count=lambda: 8,
                 get_device_name=lambda *a: "Ascend910B (stand-in)", max_memory_allocated=lambda: 0,
                 reset_peak_memory_stats=lambda: None)
'''

MINDSPEED_ADAPTOR = '''
LOADED = True
'''

MINDSPEED_OP = '''
import torch

CALLS = []

def npu_apply_fused_ema_adamw(grad, var, m, v, s, step, lr, ema_decay, beta1, beta2, eps, mode, bias_correction,
                              weight_decay):
    CALLS.append(dict(step=step.clone(), lr=lr, ema_decay=ema_decay, betas=(beta1, beta2), eps=eps, mode=mode,
                      bias_correction=bias_correction, weight_decay=weight_decay))
    assert mode == 1 and step.dtype == torch.int64 and step.shape == (1,)
    n = int(step)
    var = var * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    c1, c2 = (1 - beta1 ** n, 1 - beta2 ** n) if bias_correction else (1.0, 1.0)
    var = var - lr / c1 * m / ((v / c2).sqrt() + eps)
    s = ema_decay * s + (1 - ema_decay) * var
    return var, m, v, s
'''


@pytest.fixture
def npu(tmp_path, monkeypatch):
    """Stand-in Ascend stack importable as `torch_npu` / `mindspeed`; everything undone afterwards."""
    files = {"torch_npu/__init__.py": TORCH_NPU, "mindspeed/__init__.py": "",
             "mindspeed/megatron_adaptor.py": MINDSPEED_ADAPTOR, "mindspeed/ops/__init__.py": "",
             "mindspeed/ops/npu_apply_fused_ema_adamw.py": MINDSPEED_OP}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("OSP_DEVICE", raising=False)
    platform.accelerator.cache_clear()
    yield
    monkeypatch.undo()  # stand-ins off sys.path before the platform looks again
    platform.accelerator.cache_clear()
    if hasattr(torch, "npu"):
        del torch.npu
    for name in [m for m in sys.modules if m.split(".")[0] in ("torch_npu", "mindspeed")]:
        del sys.modules[name]
    assert platform.accelerator() == "cpu"


def test_npu_is_selected_with_hccl_fused_attention_and_mindspeed_adaptor(npu):
    assert platform.accelerator() == "npu"
    assert platform.dist_backend() == "hccl"
    assert platform.attention_backend() == "npu_fusion"
    assert sys.modules["mindspeed.megatron_adaptor"].LOADED  # patched megatron for Ascend before anything else
    assert platform.device_count() == 8 and "Ascend" in platform.device_name()


def test_attention_calls_the_fused_npu_kernel_with_bnsd_layout_scale_and_mask(npu):
    from mindspeed_mm_osp.models.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 16, generator=g) for _ in range(3))
    key_valid = torch.ones(2, 7, dtype=torch.bool)
    key_valid[0, 5:] = False
    out = attention(q, k, v, key_valid=key_valid)
    call = sys.modules["torch_npu"].CALLS[-1]
    assert call == dict(head_num=4, input_layout="BNSD", scale=1 / math.sqrt(16), keep_prob=1.0,
                        mask_shape=(2, 1, 7, 7), mask_dtype=torch.bool, q_shape=(2, 4, 7, 16))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # True = masked, as the kernel wants


def test_predictor_forward_through_the_npu_kernel_equals_the_sdpa_path(npu):
    from mindspeed_mm_osp.config import from_dict
    from mindspeed_mm_osp.config.predictor import PredictorConfig
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT

    cfg = from_dict(PredictorConfig, dict(num_layers=[1, 2, 1], sparse_n=[1, 2, 1], num_heads=2, head_dim=16,
                                          in_channels=4, timestep_embed_dim=16, caption_channels=8,
                                          pooled_projection_dim=8))
    torch.manual_seed(0)
    model = SparseUMMDiT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 8, generator=g))
    text_mask = torch.tensor([[1, 1, 1, 0, 0]])
    pooled = torch.randn(1, 8, generator=g)
    with torch.no_grad():
        on_npu = model(*inputs, encoder_attention_mask=text_mask, pooled_projections=pooled)
        n_calls = len(sys.modules["torch_npu"].CALLS)
        platform.accelerator.cache_clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OSP_DEVICE", "cpu")
            on_cpu = model(*inputs, encoder_attention_mask=text_mask, pooled_projections=pooled)
        platform.accelerator.cache_clear()
    assert n_calls == 4  # one fused attention per block (skiparse groups batched into one call)
    torch.testing.assert_close(on_npu, on_cpu, rtol=1e-4, atol=1e-5)


def test_fused_ema_adamw_selects_mindspeed_kernel_with_documented_arguments(npu):
    from mindspeed_mm_osp.optim import FusedEmaAdamW, ema_decay_at

    assert platform.npu_fused_ema_adamw() is sys.modules["mindspeed.ops.npu_apply_fused_ema_adamw"].npu_apply_fused_ema_adamw
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(4)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run():
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = FusedEmaAdamW(params, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, ema_decay=0.5)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            opt.step()
        return opt, [p.detach().clone() for p in params], [opt.state[p]["ema_params"].clone() for p in params]

    npu_opt, npu_params, npu_ema = run()
    calls = sys.modules["mindspeed.ops.npu_apply_fused_ema_adamw"].CALLS
    assert npu_opt.defaults["fused"] is False and len(calls) == 6
    assert [int(c["step"]) for c in calls[::2]] == [1, 2, 3]
    assert [c["ema_decay"] for c in calls[::2]] == [ema_decay_at(n, 0.5) for n in (1, 2, 3)]
    assert all(c["mode"] == 1 and c["bias_correction"] and c["betas"] == (0.8, 0.95) and c["weight_decay"] == 0.1
               for c in calls)
    platform.accelerator.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSP_DEVICE", "cpu")
        _, cpu_params, cpu_ema = run()
    platform.accelerator.cache_clear()
    for a, b in zip(npu_params + npu_ema, cpu_params + cpu_ema):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
