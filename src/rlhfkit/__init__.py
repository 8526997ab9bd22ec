"""rlhfkit: correct, visible and fast RLHF (SFT, reward models, PPO, GRPO, RLOO, DPO, online DPO)."""

import logging as _logging

__version__ = "0.1.0"


class _NoCpuFallbackNote(_logging.Filter):
    """transformers' save_pretrained imports DeepSpeed whenever it is installed (through accelerate),
    and DeepSpeed then warns, on a machine without a GPU, that it falls back to the CPU: no news on
    that machine, and confusing in a run that does not use DeepSpeed. Only that line is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


_logging.getLogger("DeepSpeed").addFilter(_NoCpuFallbackNote())
