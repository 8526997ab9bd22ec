"""The sub-commands that train or evaluate: name -> config class, run function and a one-line help.

Paths are strings resolved on use, so listing the commands imports no trainer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from rlhfkit.models.loading import library_progress_bars


@dataclass(frozen=True)
class Command:
    config: str  # "module:ConfigClass"
    run: str  # "module:function", called as function(cfg, strategy)
    help: str

    def config_class(self):
        return resolve(self.config)

    def runner(self):
        """The run function, called as ``runner(cfg, strategy)``; with ``train.progress`` false the
        libraries' own progress bars (transformers' loading and saving) are off for the call too."""
        run = resolve(self.run)

        def call(cfg, strategy=None):
            with library_progress_bars(getattr(getattr(cfg, "train", None), "progress", True)):
                return run(cfg, strategy)

        return call


COMMANDS: dict[str, Command] = {
    "sft": Command("rlhfkit.config:SFTConfig", "rlhfkit.trainers.sft:train_sft",
                   "supervised fine-tuning on responses"),
    "rm": Command("rlhfkit.config:RewardConfig", "rlhfkit.trainers.reward:train_reward_model",
                  "Bradley-Terry reward model"),
    "ppo": Command("rlhfkit.trainers.ppo:PPOConfig", "rlhfkit.trainers.ppo:train_ppo",
                   "PPO with actor, critic, reward and reference models"),
    "grpo": Command("rlhfkit.trainers.grpo:GRPOConfig", "rlhfkit.trainers.grpo:train_grpo",
                    "GRPO: group-normalised advantages, no critic"),
    "rloo": Command("rlhfkit.trainers.grpo:RLOOConfig", "rlhfkit.trainers.grpo:train_grpo",
                    "RLOO: leave-one-out baseline, no critic"),
    "dpo": Command("rlhfkit.trainers.dpo:DPOConfig", "rlhfkit.trainers.dpo:train_dpo",
                   "DPO / IPO / conservative DPO on preference pairs (optionally SFT on the chosen first)"),
    "online-dpo": Command("rlhfkit.trainers.online_dpo:OnlineDPOConfig", "rlhfkit.trainers.online_dpo:train_online_dpo",
                          "online iterative DPO, or rejection-sampling fine-tuning (mode: rsft)"),
    "pm": Command("rlhfkit.trainers.pm:PMConfig", "rlhfkit.trainers.pm:train_pm",
                  "pairwise preference model (A/B next token), with LLM-as-judge baseline"),
    "eval": Command("rlhfkit.eval.config:EvalConfig", "rlhfkit.eval.policy_compare:run_eval",
                    "policies vs a baseline: win rate with CI, gold/proxy reward, KL, length bias, RM accuracy"),
}


def resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def config_classes() -> dict[str, tuple[type, str]]:
    """name -> (config class, help), for the configuration reference."""
    return {name: (c.config_class(), c.help) for name, c in COMMANDS.items()}


