"""CUDA checks (`pytest -m gpu`, run by scripts/device_check.sh; skipped without CUDA by tests/conftest.py).

Each compares the CUDA path with the CPU fp32 path that the rest of the suite verifies: fused SDPA through
skiparse, the bf16 predictor forward and backward, megatron groups over NCCL, FusedEmaAdamW's fused CUDA kernel,
chunked WF-VAE decoding. The NCCL test runs in a fresh process, since the fork harness cannot fork a parent
that has initialised CUDA.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mindspeed_mm_osp.config import AEConfig, from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
CFG = dict(num_layers=[1, 2, 1], sparse_n=[1, 4, 1], num_heads=4, head_dim=64, in_channels=4,
           timestep_embed_dim=64, caption_channels=32, pooled_projection_dim=16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def test_skiparse_runs_a_fused_sdpa_kernel_in_bf16_and_matches_cpu_fp32():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mindspeed_mm_osp.models.predictor import skiparse_attention, skiparse_key_mask

    g = torch.Generator().manual_seed(0)
    L, S, B, H, D = 4 * 16 * 16, 32, 2, 4, 64
    tensors = [torch.randn(n, B, H, D, generator=g) for n in (L, L, L, S, S, S)]
    video_valid, text_valid = torch.ones(B, L, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool)
    text_valid[1, 20:] = False
    for k, group in ((1, False), (4, False), (4, True)):
        mask = skiparse_key_mask(video_valid, text_valid, k, group)
        ref = skiparse_attention(*tensors, mask, k, group)
        cuda = [t.cuda().bfloat16() for t in tensors]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            out = skiparse_attention(*cuda, mask.cuda(), k, group)  # no math fallback: a fused kernel ran
        for o, r in zip(out, ref):
            assert o.dtype == torch.bfloat16 and _rel(o, r) < 1e-2


def test_bf16_forward_and_backward_match_cpu_fp32():
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict

    cfg = from_dict(PredictorConfig, CFG)
    torch.manual_seed(0)
    ref_model = SparseUMMDiT(cfg).train()
    model = SparseUMMDiT(cfg, params_dtype=torch.bfloat16)
    load_merged_state_dict(model, local_state_dict(ref_model))
    model.cuda().train()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 3, 16, 16, generator=g), torch.tensor([200.0, 700.0])
    text, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 16, generator=g)
    ref = ref_model(x, t, text, pooled_projections=pooled)
    ref.square().mean().backward()
    out = model(x.cuda().bfloat16(), t.cuda(), text.cuda().bfloat16(), pooled_projections=pooled.cuda().bfloat16())
    out.float().square().mean().backward()
    assert _rel(out, ref) < 1.5e-2
    grads = dict(ref_model.named_parameters())
    worst = max(_rel(p.grad, grads[n].grad) for n, p in model.named_parameters() if grads[n].grad.norm() > 0)
    assert worst < 0.1  # bf16 gradients of every parameter within 10% (relative L2) of fp32


def test_megatron_groups_over_nccl_in_a_single_rank_job(tmp_path):
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from mindspeed_mm_osp import platform
        from mindspeed_mm_osp.parallel import initialize_distributed, destroy_distributed
        from megatron.core import parallel_state as ps
        initialize_distributed(tp=1, seed=0, timeout_minutes=2)
        assert dist.get_backend() == "nccl" == platform.dist_backend()
        x = torch.ones(4, device=platform.device())
        for group in (ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()):
            dist.all_reduce(x, group=group)
        assert x.device.type == "cuda" and x.tolist() == [1.0] * 4
        destroy_distributed()
        print("nccl ok")
    """)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "nccl ok" in result.stdout, result.stderr[-3000:]


def test_fused_ema_adamw_on_cuda_matches_adamw_plus_ema():
    from mindspeed_mm_osp.optim import FusedEmaAdamW, ema_decay_at

    torch.manual_seed(0)
    weights = [torch.randn(257, 129), torch.randn(129)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(5)]
    params = [torch.nn.Parameter(w.clone().cuda()) for w in weights]
    ref = [torch.nn.Parameter(w.clone().cuda()) for w in weights]
    opt = FusedEmaAdamW(params, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, ema_decay=0.9)
    # torch's own fused AdamW: the same kernel (two kernels' rounding differences grow through Adam's division)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, fused=True)
    emas = [p.detach().clone() for p in ref]
    assert opt.defaults["fused"] is True
    for n, step_grads in enumerate(grads, start=1):
        for p, q, gr in zip(params, ref, step_grads):
            p.grad, q.grad = gr.clone().cuda(), gr.clone().cuda()
        opt.step()
        ref_opt.step()
        d = ema_decay_at(n, 0.9)
        for e, q in zip(emas, ref):
            e.mul_(d).add_(q.detach(), alpha=1 - d)
    for p, q, e in zip(params, ref, emas):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["ema_params"], e, rtol=1e-5, atol=1e-6)


def test_chunked_vae_decode_on_cuda_equals_one_pass_and_cpu():
    from mindspeed_mm_osp.models.ae import WFVAE, tiny_ae_config_dict

    torch.manual_seed(0)
    cfg = from_dict(AEConfig, tiny_ae_config_dict(), path="ae")
    vae = WFVAE(cfg).eval()
    z = torch.randn(1, cfg.latent_dim, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z)
        vae.cuda()
        full = vae.decode(z.cuda())
        for chunk in (1, 2, 3):
            torch.testing.assert_close(vae.decode(z.cuda(), chunk), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full.cpu(), ref, rtol=1e-3, atol=1e-3)
