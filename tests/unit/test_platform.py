import subprocess
import sys

import torch

from mindspeed_mm_osp import platform


def test_import_never_loads_npu_stack():
    code = ("import sys, mindspeed_mm_osp, mindspeed_mm_osp.config, mindspeed_mm_osp.platform, mindspeed_mm_osp.parallel;"
            "mindspeed_mm_osp.platform.accelerator();"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch_npu','mindspeed')]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_selection_here():
    assert platform.accelerator() == "cpu"
    assert platform.device() == torch.device("cpu")
    assert platform.dist_backend() == "gloo"
    assert platform.attention_backend() == "sdpa"


def test_megatron_cpu_adaptor_routes_cuda_calls():
    platform.adapt_megatron()
    x = torch.zeros(2, device="cuda")
    assert x.device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).cuda().device.type == "cpu"
    from megatron.core.tensor_parallel import random as mrandom

    state = mrandom._get_cuda_rng_state()
    a = torch.rand(3)
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(a, torch.rand(3))
