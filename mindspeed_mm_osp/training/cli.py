"""`pretrain.py` / `osp-pretrain`: parse flags, train, turn expected failures into clear exits."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

from .arguments import parse_args


def main(argv: Optional[Sequence[str]] = None) -> None:
    from ..errors import user_errors
    from ..parallel import destroy_distributed
    from .trainer import TrainingStopped, pretrain

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--plan" in argv:  # the planner reads the same flags (plus its own) and exits before anything is built
        from ..tools.plan import main as plan_main

        return plan_main(argv)
    args = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    try:
        pretrain(args)
    except user_errors() as e:
        logging.getLogger("mindspeed_mm_osp.train").error("error: %s", e)
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(f"pretrain.py: stopped: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
