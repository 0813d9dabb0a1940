"""`pretrain.py` / `osp-pretrain`: parse flags, check the paths they name, train; errors per `errors.entry_point`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError, check_input_path, entry_point, env_int
from .arguments import parse_args
from .args import TrainingArgs


def _is_checkpoint(folder: Path, step: Optional[int]) -> bool:
    from ..checkpoint.layout import iteration_dir, tracker_path

    return tracker_path(folder).is_file() or (step is not None and iteration_dir(folder, step).is_dir())


def check_resume_path(args: TrainingArgs) -> None:
    """The `--load` rule (docs/training.md): the resume folder must hold a checkpoint, unless it is empty or absent
    and the same folder as `--save` (the "resume if present" launcher pattern). Under LoRA the resume folder is
    `--lora-load` and `--load` names the base weights, which must exist."""
    if args.lora_r is not None and args.load is not None:
        check_input_path("--load (LoRA base weights)", args.load)
    flag, path = ("--lora-load", args.lora_load) if args.lora_r is not None else ("--load", args.load)
    if path is None:
        return
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a checkpoint folder written by --save (merged weights "
                        "go to predictor.from_pretrained in the model JSON)")
    if folder.is_dir() and _is_checkpoint(folder, args.ckpt_step):
        return
    empty = not folder.exists() or not any(folder.iterdir())
    same_as_save = args.save is not None and folder.resolve() == Path(args.save).resolve()
    if empty and same_as_save:
        return
    what = f"has no iteration {args.ckpt_step}" if args.ckpt_step is not None and folder.is_dir() else (
        "is not a checkpoint (no latest_checkpointed_iteration.txt)" if folder.exists() else "does not exist")
    raise UserError(f"{flag} {path}: {what}; pass a checkpoint folder written by --save, or drop {flag} to start "
                    f"from scratch (an empty or absent folder is accepted only when it is also --save)")


def check_output_paths(args: TrainingArgs) -> None:
    """Folders the run writes into are folders (or absent), not files."""
    for flag, path in (("--save", args.save), ("--tensorboard-dir", args.tensorboard_dir),
                       ("--wandb-save-dir", args.wandb_save_dir)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: is a file, expected a folder (absent, or written by an earlier run)")


def check_config_paths(args: TrainingArgs) -> None:
    """Files the model and data JSONs name (data_path, annotation files, encoder and VAE weights) and the validation
    prompt file exist and are of the right kind, before anything is built."""
    from ..config import load_data_config, load_model_config

    model, data = load_model_config(args.mm_model), load_data_config(args.mm_data)
    model.check_paths(args.mm_model)
    data.check_paths(args.mm_data, tokenizers=not model.load_text_features,
                     feature_cache=model.load_video_features or model.load_text_features)
    if args.mm_valid_data:  # validated online: tokenizers and media, never a feature cache
        check_input_path("--mm-valid-data", args.mm_valid_data, kind="file")
        load_data_config(args.mm_valid_data).check_paths(args.mm_valid_data, tokenizers=True, feature_cache=False)
    if args.validation_prompts:
        check_input_path("--validation-prompts", args.validation_prompts, kind="file")


@entry_point("pretrain.py")
def main(argv: Optional[Sequence[str]] = None) -> None:
    from ..config.vae_training import is_vae_training_config
    from ..parallel import destroy_distributed
    from .distill import DistillTrainer
    from .loop import TrainingStopped
    from .trainer import pretrain
    from .vae_trainer import check_vae_config, pretrain_vae

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--plan" in argv:  # the planner reads the same flags (plus its own) and exits before anything is built
        from ..tools.plan import main as plan_main

        return plan_main(argv)
    args = parse_args(argv, world_size=env_int("WORLD_SIZE", 1, low=1))
    vae = is_vae_training_config(args.mm_model)  # the model JSON selects WF-VAE training (docs/vae_training.md)
    check_resume_path(args)
    check_output_paths(args)
    check_vae_config(args) if vae else check_config_paths(args)
    try:
        pretrain_vae(args) if vae else DistillTrainer(args).fit() if args.distill else pretrain(args)
    except TrainingStopped as e:
        print(f"pretrain.py: stopped: {e}", file=sys.stderr)
        sys.exit(3)
    except UserError:
        raise  # the boundary prints it, once
    except Exception as e:
        logging.getLogger("mindspeed_mm_osp.train").error("error: %s", e)
        raise
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
