"""rlhfkit: correct, visible and fast RLHF (SFT, reward models, PPO, GRPO, RLOO, DPO, online DPO)."""

__version__ = "0.1.0"
