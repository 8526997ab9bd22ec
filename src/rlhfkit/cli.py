"""``rlhfkit``: one entry point, one sub-command per stage.

    rlhfkit sft --config configs/sft.yaml optim.lr=1e-5 train.output_dir=runs/sft
    rlhfkit rm  --config configs/rm.yaml model.name=runs/sft/model
    rlhfkit sft --help                                      # every config key with type, default, meaning
    rlhfkit make-data --task sentiment --out data/sentiment
    rlhfkit merge runs/sft/model --out runs/sft/merged     # LoRA adapter -> full model

Trailing ``key.path=value`` arguments override the YAML config; the merged config is validated
(unknown keys, types, impossible combinations) before any model loads. The parallel layout (one
process, DDP, FSDP2, ZeRO) is chosen here, once per run, and passed to the trainer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rlhfkit.config import ConfigError, load_config
from rlhfkit.config.reference import explained_yaml, help_text
from rlhfkit.registry import COMMANDS, Command


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser whose --help ends with its config keys (computed only when shown:
    listing them imports the trainer's module)."""

    command: Command | None = None

    def format_help(self) -> str:
        if self.command is not None and self.epilog is None:
            self.epilog = help_text(self.command.config_class())
        return super().format_help()


def _add_trainer(sub, name: str, command: Command) -> None:
    p = sub.add_parser(name, help=command.help, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"{command.help}. Trailing key.path=value pairs override the config.")
    p.command = command
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--explain", action="store_true", help="with --print-config: each key's meaning as a comment")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit", description="Correct, visible and fast RLHF.")
    parser.add_argument("--log-level", default=os.environ.get("RLHFKIT_LOG", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, command in COMMANDS.items():
        _add_trainer(sub, name, command)
    pl = sub.add_parser("pipeline", help="run the stages of a workflow in order (sft, rm, ppo/dpo/..., eval)")
    pl.add_argument("--config", "-c", required=True, help="pipeline YAML (see configs/demo.yaml)")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=runs/x stages.0.config.optim.lr=1e-5")
    rp = sub.add_parser("report", help="(re)build report.html for one run directory, or compare several")
    rp.add_argument("runs", nargs="+", help="run directories")
    rp.add_argument("--out", help="output HTML (default: RUN/report.html; required when comparing)")
    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base: a full transformers model directory",
                        description="Merge a LoRA adapter directory (as trainers save it with model.lora.enabled) "
                                    "into its base model and write a plain transformers directory with the tokenizer. "
                                    "A reward/value model adapter gives a *ForSequenceClassification model.")
    mg.add_argument("adapter", help="adapter directory (holds adapter_config.json)")
    mg.add_argument("--out", required=True, help="output directory (written atomically)")
    mg.add_argument("--base", help="base model to merge into (default: the one named in adapter_config.json)")
    mg.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the merged weights (auto: as the trainers load, fp32 on CPU)")
    md = sub.add_parser("make-data", help="generate a built-in task's datasets from a seed", add_help=False)
    md.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def run_trainer(name: str, config: str | None, overrides: list[str], resume: bool = False, print_only: bool = False,
                explain: bool = False):
    """Load and validate ``name``'s config, then run it on the strategy its train section asks for."""
    from rlhfkit.parallel import make_strategy

    command = COMMANDS[name]
    if resume:
        overrides = [*overrides, "train.resume=true"]
    cfg = load_config(command.config_class(), config, overrides)
    if print_only:
        import dataclasses

        import yaml

        print(explained_yaml(cfg) if explain else yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
        return None
    strategy = make_strategy(cfg.train, getattr(cfg, "model", None))
    return command.runner()(cfg, strategy)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-data"]:  # its own argparse (argparse.REMAINDER drops leading --options)
        from rlhfkit.tasks.build import main as build_main

        return build_main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from rlhfkit.data import DataError
    from rlhfkit.judges.rewards import RewardFunctionError
    from rlhfkit.training import TrainingDiverged

    # Errors in what the user gave us (config, data, a reward function) and a run stopped for
    # non-finite updates end with one clear line, not a traceback from inside the trainer.
    user_errors = (ConfigError, DataError, FileNotFoundError, RewardFunctionError)

    if args.command == "report":
        if len(args.runs) > 1 and not args.out:
            parser.error("comparing several runs needs --out FILE")
        try:
            from rlhfkit.report import build_report
        except ConfigError as e:  # matplotlib missing
            print(f"rlhfkit report: error: {e}", file=sys.stderr)
            return 2
        print(build_report(args.runs, args.out))
        return 0
    if args.command == "merge":
        from rlhfkit.models.start import merge_adapter

        try:
            print(merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype))
        except (FileNotFoundError, ValueError) as e:
            print(f"rlhfkit merge: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "pipeline":
            from rlhfkit.pipeline import run_pipeline

            run_pipeline(args.config, args.overrides)
        else:
            run_trainer(args.command, args.config, args.overrides, args.resume, args.print_config, args.explain)
    except user_errors as e:
        print(f"rlhfkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"rlhfkit {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
