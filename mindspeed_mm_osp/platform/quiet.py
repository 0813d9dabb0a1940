"""Third-party messages known to be harmless, silenced at their source: exact messages, never whole categories.

- megatron-core's Megatron-FSDP module logs, on every import, that it runs without Transformer Engine and that it
  found megatron-core (we do not use Megatron-FSDP; it is imported as a side effect of megatron's DDP);
- transformers draws a "Loading weights" progress bar per encoder and rank (the weights are local and load in
  milliseconds).

megatron-core's import-time warnings about the missing Transformer Engine / Apex are in
`megatron_adaptor.quiet_cpu_warnings` (CPU only: on an accelerator they can matter).
"""

from __future__ import annotations

import logging

_FSDP = "megatron.core.distributed.fsdp.src.megatron_fsdp"
HARMLESS_LOG_MESSAGES = {
    f"{_FSDP}.mixed_precision": "Using Megatron-FSDP without Transformer Engine.",
    f"{_FSDP}.param_and_grad_buffer": "Detected Megatron Core, using Megatron-FSDP with Megatron.",
    f"{_FSDP}.megatron_fsdp": "Detected Megatron Core, using Megatron-FSDP with Megatron.",
}


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def silence_harmless_logs() -> None:
    """Filter the exact harmless log lines on their loggers (cheap; idempotent)."""
    for name, message in HARMLESS_LOG_MESSAGES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in log.filters):
            log.addFilter(_DropMessage(message))


def silence_third_party() -> None:
    """Everything above; for entry points that load the text encoders (imports transformers' logging module)."""
    import transformers.utils.logging as hf_logging

    silence_harmless_logs()
    hf_logging.disable_progress_bar()
