"""Helpers for tests and benchmarks, shipped with the package so they work from an installed wheel.

`distributed`: run a function on N forked local ranks, DDP gradients, weight perturbation. `tiny`: the shared
tiny predictor configs, the tiny model JSON and an end-to-end tiny setup. `checkpoints`: training checkpoints
written by hand. `memory`: the memory planner's accuracy grid.
"""

from .checkpoints import write_training_checkpoint
from .distributed import (
    DistributedTestError,
    ddp_outputs_and_grads,
    fork_ranks,
    free_port,
    perturb_parameters,
    run_distributed,
    single_rank,
)
from .tiny import (
    TINY_PREDICTOR,
    TINY_PREDICTOR_7_STAGES,
    TinySetup,
    make_tiny_setup,
    tiny_model_config,
    tiny_predictor_config,
    tiny_predictor_weights,
)

__all__ = ["DistributedTestError", "TINY_PREDICTOR", "TINY_PREDICTOR_7_STAGES", "TinySetup", "ddp_outputs_and_grads",
           "fork_ranks", "free_port", "make_tiny_setup", "perturb_parameters", "run_distributed", "single_rank",
           "tiny_model_config", "tiny_predictor_config", "tiny_predictor_weights", "write_training_checkpoint"]
