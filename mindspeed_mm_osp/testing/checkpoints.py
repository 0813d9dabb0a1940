"""Training checkpoints written by hand, for tests of the checkpoint readers."""

from __future__ import annotations


def write_training_checkpoint(root, model: dict, ema: dict, tp: int, iteration: int = 20,
                              placeholder: bool = False):
    """The layout `save_checkpoint` writes (model and EMA shards, tracker), written by hand from merged state
    dicts so tests of the readers do not depend on the writer. `placeholder`: add a megatron `_extra_state`
    entry to each shard (readers drop them)."""
    from ..checkpoint.convert import split_weights
    from ..checkpoint.io import atomic_save
    from ..checkpoint.layout import model_file, tracker_path

    for rank, (m, e) in enumerate(zip(split_weights(model, tp), split_weights(ema, tp))):
        if placeholder:
            m = {**m, "attn1_like._extra_state": None}
        atomic_save({"iteration": iteration, "parallel": {"tensor_model_parallel_size": tp}, "model": m,
                     "ema_model": e, "args": {}}, model_file(root, iteration, rank))
    tracker_path(root).write_text(str(iteration))
    return root


__all__ = ["write_training_checkpoint"]
