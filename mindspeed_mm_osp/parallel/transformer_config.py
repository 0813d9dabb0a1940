"""One factory for the megatron-core TransformerConfig used by TP layers, DDP and finalize_model_grads."""

from __future__ import annotations

import warnings

import torch

from .. import platform


def make_transformer_config(num_heads: int, hidden_size: int, *, tp: int | None = None,
                            sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                            use_cpu_initialization: bool | None = None, perform_initialization: bool = True):
    """TransformerConfig with all CUDA-only fusions off.

    megatron's DDP and `finalize_model_grads` read `sequence_parallel` from this config to
    sum the grads of replicated parameters tagged `.sequence_parallel` across TP.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    if use_cpu_initialization is None:
        use_cpu_initialization = platform.accelerator() == "cpu"
    with warnings.catch_warnings():
        # megatron-core 0.16 warns about its own default cuda_graph_scope on every construction
        warnings.filterwarnings("ignore", message="full scope is deprecated")
        return TransformerConfig(
            num_layers=1,
            hidden_size=hidden_size,
            num_attention_heads=num_heads,
            tensor_model_parallel_size=tp,
            sequence_parallel=bool(sequence_parallel and tp > 1),
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            use_cpu_initialization=use_cpu_initialization,
            perform_initialization=perform_initialization,
            gradient_accumulation_fusion=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            tp_comm_overlap=False,
        )
