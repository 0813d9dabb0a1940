"""megatron-core Column/RowParallelLinear on CPU/gloo through our adaptor: TP (and SP) equal a single process."""

import pytest
import torch

from mindspeed_mm_osp.testing import run_distributed

HIDDEN, FFN, SEQ, BATCH = 8, 16, 6, 3


def reference(seed):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(FFN, HIDDEN, generator=g)
    b1 = torch.randn(FFN, generator=g)
    w2 = torch.randn(HIDDEN, FFN, generator=g)
    b2 = torch.randn(HIDDEN, generator=g)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    return w1, b1, w2, b2, x


def tp_mlp(rank, world_size, sequence_parallel):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region)

    from mindspeed_mm_osp.parallel import make_transformer_config

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = make_transformer_config(num_heads=2, hidden_size=HIDDEN, sequence_parallel=sequence_parallel)
    fc1 = ColumnParallelLinear(HIDDEN, FFN, config=cfg, init_method=torch.nn.init.zeros_, bias=True, gather_output=False)
    fc2 = RowParallelLinear(FFN, HIDDEN, config=cfg, init_method=torch.nn.init.zeros_, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    w1, b1, w2, b2, x = reference(7)
    rows = FFN // tp
    with torch.no_grad():
        fc1.weight.copy_(w1[tp_rank * rows:(tp_rank + 1) * rows])
        fc1.bias.copy_(b1[tp_rank * rows:(tp_rank + 1) * rows])
        fc2.weight.copy_(w2[:, tp_rank * rows:(tp_rank + 1) * rows])
        fc2.bias.copy_(b2)
    x = x.clone().requires_grad_(True)
    inp = scatter_to_sequence_parallel_region(x) if cfg.sequence_parallel else x
    h, _ = fc1(inp)
    y, _ = fc2(torch.nn.functional.gelu(h))
    if cfg.sequence_parallel:
        y = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
    (y * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw1": fc1.weight.grad, "dw2": fc2.weight.grad, "tp_rank": tp_rank,
            "dp_rank": ps.get_data_parallel_rank(), "sp": cfg.sequence_parallel}


def single_process():
    w1, b1, w2, b2, x = (t.clone().requires_grad_(True) for t in reference(7))
    y = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    (y * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
    return y.detach(), x.grad, w1.grad, w2.grad


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_column_row_parallel_matches_single_process(world_size, sequence_parallel):
    y, dx, dw1, dw2 = single_process()
    results = run_distributed(tp_mlp, world_size, sequence_parallel, tp=2)
    rows = FFN // 2
    assert sorted((r["tp_rank"], r["dp_rank"]) for r in results) == sorted(
        (t, d) for t in range(2) for d in range(world_size // 2))
    for r in results:
        assert r["sp"] == sequence_parallel
        torch.testing.assert_close(r["y"], y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["dx"], dx, rtol=1e-5, atol=1e-5)
        t = r["tp_rank"]
        torch.testing.assert_close(r["dw1"], dw1[t * rows:(t + 1) * rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["dw2"], dw2[:, t * rows:(t + 1) * rows], rtol=1e-5, atol=1e-5)


def test_unsupported_layouts_are_rejected():
    from mindspeed_mm_osp.parallel import ParallelConfigError, check_layout

    assert check_layout(8, 4).data_parallel == 2
    with pytest.raises(ParallelConfigError, match="pipeline-model-parallel-size=2 is not supported"):
        check_layout(8, 2, pp=2)
    assert check_layout(8, 2, cp=2).data_parallel == 2
    with pytest.raises(ParallelConfigError, match=r"tensor-model-parallel-size=2 x --context-parallel-size=3 = 6"):
        check_layout(8, 2, cp=3)
    with pytest.raises(ParallelConfigError, match="must divide the world size 6"):
        check_layout(6, 4)
