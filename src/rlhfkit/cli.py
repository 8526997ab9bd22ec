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
import signal
import sys

from rlhfkit import __version__, envvars
from rlhfkit.argparsing import OneLineParser
from rlhfkit.config import ConfigError, load_config, to_dict
from rlhfkit.config.loader import validate
from rlhfkit.config.reference import explained_yaml, help_text
from rlhfkit.registry import COMMANDS, Command


class _CommandParser(OneLineParser):
    """A sub-command's parser whose --help ends with its config keys (computed only when shown:
    listing them imports the trainer's module)."""

    command: Command | None = None

    def format_help(self) -> str:
        if self.command is not None and self.epilog is None:
            self.epilog = help_text(self.command.config_class())
        return super().format_help()


class _Once(argparse.Action):
    """An option that may be given once (a second -c would silently replace the first file)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice: name one config file (and override keys after it)")
        setattr(namespace, self.dest, values)


def _add_trainer(sub, name: str, command: Command) -> None:
    p = sub.add_parser(name, help=command.help, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"{command.help}. Trailing key.path=value pairs override the config.")
    p.command = command
    p.add_argument("--config", "-c", action=_Once, help="YAML config file (once)")
    trains = name != "eval"  # eval has no checkpoints to continue and no optimizer
    if trains:
        p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint "
                       "(refused if there is none, or if the config or data differ: see train.resume_mismatch_ok)")
        p.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds a run, "
                       "deleting its checkpoints, metrics, models and results")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--log-level", type=str.upper, choices=envvars.LOG_LEVELS, default=argparse.SUPPRESS,
                   help="as rlhfkit --log-level")
    p.add_argument("--explain", action="store_true",
                   help="print the resolved config with each key's meaning as a comment, and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. "
                   + ("optim.lr=1e-5" if trains else "rollout.max_new_tokens=64 prompts.limit=100"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="rlhfkit", description="Correct, visible and fast RLHF.")
    parser.add_argument("--version", "-V", action="version", version=f"rlhfkit {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("RLHFKIT_LOG", "").strip().upper() or "WARNING",
                        type=str.upper, choices=envvars.LOG_LEVELS,
                        help="what rlhfkit logs besides its progress and results "
                        "(default: $RLHFKIT_LOG, else WARNING); also accepted after the command")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, command in COMMANDS.items():
        _add_trainer(sub, name, command)
    pl = sub.add_parser("pipeline", help="run the stages of a workflow in order (sft, rm, ppo/dpo/..., eval)")
    pl.add_argument("--config", "-c", required=True, help="pipeline YAML (see configs/demo.yaml)")
    pl.add_argument("--print-config", action="store_true",
                    help="print each stage's resolved config (as `rlhfkit KIND --print-config` would) and exit")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=runs/x stages.0.config.optim.lr=1e-5")
    rp = sub.add_parser("report", help="(re)build report.html for one run directory, or compare several")
    rp.add_argument("runs", nargs="+", help="run directories")
    rp.add_argument("--out", help="output HTML (default: RUN/report.html; required when comparing)")
    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base: a full transformers model directory",
                        description="Merge a LoRA adapter directory (as trainers save it with model.lora.enabled) "
                                    "into its base model and write a plain transformers directory with the tokenizer. "
                                    "A reward/value model adapter gives a *ForSequenceClassification model.")
    mg.add_argument("adapter", help="adapter directory (holds adapter_config.json)")
    mg.add_argument("--out", required=True, help="output directory (written atomically; refused if it exists "
                                                  "and is not empty, unless --overwrite)")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing --out directory whole")
    mg.add_argument("--base", help="base model to merge into (default: the one named in adapter_config.json)")
    mg.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the merged weights (auto: as the trainers load, fp32 on CPU)")
    md = sub.add_parser("make-data", help="generate a built-in task's datasets from a seed", add_help=False)
    md.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command``: its errors name the command (`rlhfkit eval: error: ...`)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _one_process(command: str) -> None:
    """eval and pipeline are single-process orchestration (docs/distributed.md): refused, in one
    line, under torchrun rather than run once per process into the same directory."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise ConfigError(f"{command} runs on one process (it orchestrates; the trainers are the distributed part): "
                          f"launch it without torchrun (WORLD_SIZE={world})")


def run_trainer(name: str, config: str | None, overrides: list[str], resume: bool = False, print_only: bool = False,
                explain: bool = False, overwrite: bool = False):
    """Load and validate ``name``'s config, then run it on the strategy its train section asks for."""
    from rlhfkit.parallel import make_strategy

    command = COMMANDS[name]
    if name == "eval":
        _one_process("eval")
    if resume:
        overrides = [*overrides, "train.resume=true"]
    if overwrite:
        overrides = [*overrides, "train.overwrite=true"]
    # printed first, checked after: `rlhfkit sft --explain` shows the keys before data.train is set
    cfg = load_config(command.config_class(), config, overrides, check=not print_only)
    if print_only:
        import yaml

        print(explained_yaml(cfg) if explain else yaml.safe_dump(to_dict(cfg), sort_keys=False), end="", flush=True)
        validate(cfg, "", "config (printed above)")
        return None
    strategy = make_strategy(cfg.train, getattr(cfg, "model", None))
    return command.runner()(cfg, strategy)


def _print_stages(path: str, overrides: list[str]) -> None:
    """Every stage's resolved config, one YAML document each, headed by its name, kind and
    directory (the pipeline's checks run first; nothing is written)."""
    import yaml

    from rlhfkit.pipeline import plan

    _, stages = plan(path, overrides)
    docs = [f"# stage {i}: {spec.name} (rlhfkit {spec.kind}) -> {cfg.train.output_dir}\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False) for i, (spec, cfg) in enumerate(stages)]
    print("---\n".join(docs), end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user or OS error (bad config or data, a refused run directory or
    checkpoint, a missing file, a full or read-only disk, a reward module that does not import)
    ends with one line on stderr and exit status 2, a run stopped by non-finite updates with 3;
    RLHFKIT_DEBUG=1 shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known = (*COMMANDS, "pipeline", "report", "merge", "make-data")
    command = next((a for a in argv if a in known), "")
    # one process: SIGTERM stops it as Ctrl-C does; under torchrun the launcher's SIGTERM (sent to the
    # others when one process fails) keeps its default, an immediate stop, not a wait in a collective
    previous = _on_sigterm(_terminate if os.environ.get("WORLD_SIZE", "1") == "1" else None)
    try:
        return _main(argv)
    except BrokenPipeError:  # `rlhfkit ... | head`: the reader has what it wanted; end quietly
        _silence_stdout()
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (a scheduler's stop): writes in progress are cleaned up
        _close_bars()
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"rlhfkit {command}: {what}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        from rlhfkit.training import TrainingDiverged

        if os.environ.get("RLHFKIT_DEBUG", "").strip() == "1":  # any other value was refused (`envvars`)
            raise
        _close_bars()
        if isinstance(e, TrainingDiverged):
            print(f"rlhfkit {command}: stopped: {_one_line(e, command)}", file=sys.stderr)
            return 3
        rank = _peer_failed(e)
        if rank is not None:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            print(f"rlhfkit {command}: stopped on rank {rank}: another process of this job failed (its error is "
                  f"reported first, by that process): {first}", file=sys.stderr)
            return 2
        if not _is_user_error(e):
            raise
        print(f"rlhfkit {command}: error: {_one_line(e, command)}", file=sys.stderr)
        return 2
    finally:
        _on_sigterm(previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it stops as after Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM and return the one it replaces (None where signals cannot
    be set: not the main thread, or ``handler`` None)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a library caller's worker thread): leave signals alone
        return None


def _close_bars() -> None:
    """Close the progress bars a stopped run left open, so that the error line is the last line
    (an open bar redraws itself after it)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _peer_failed(e: BaseException) -> int | None:
    """This process's rank when ``e`` is a collective that failed because another process of the
    job went away (the connection to it closed or reset: gloo's "Connection closed by peer", a
    DistNetworkError), else None: the process that stopped reports why. Any other failure of a
    collective (a timeout, a backend error) keeps its traceback: its cause may be here."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(e)
    if isinstance(e, dist.DistNetworkError) or (isinstance(e, RuntimeError) and any(
            s in text for s in ("closed by peer", "reset by peer"))):
        return dist.get_rank()
    return None


def _is_user_error(e: BaseException) -> bool:
    """Errors caused by what the user gave or by the machine, not by a bug in rlhfkit: reported in
    one line. SyntaxError/ImportError come from user code (a reward module) or a broken install;
    ValueError is how configs, data, reward specs and torch's own argument checks say no."""
    import yaml

    from rlhfkit.data import DataError
    from rlhfkit.judges.rewards import RewardFunctionError

    kinds = (ConfigError, DataError, RewardFunctionError, OSError, ValueError, SyntaxError, ImportError,
             yaml.YAMLError, MemoryError)
    return isinstance(e, kinds) or type(e).__name__ == "OutOfMemoryError" or _is_template_error(e)


def _is_template_error(e: BaseException) -> bool:
    """A chat template (a model's, or data.chat_template) that fails to render, or that tried to
    reach Python internals and was stopped by transformers' sandbox."""
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - transformers requires jinja2
        return False
    return isinstance(e, TemplateError)


# What a rerun after a full disk does, and the key that names where a command writes.
_AFTER_A_FULL_DISK = {**{c: " with --resume: the run continues from its last complete checkpoint, if it saved one "
                            "(train.save_every)" for c in COMMANDS if c != "eval"},
                      "pipeline": ": the stages continue from their last complete checkpoints"}
_OUTPUT_KEY = {"pipeline": "output_dir", "report": "--out", "merge": "--out", "make-data": "--out"}


def _one_line(e: BaseException, command: str = "") -> str:
    """The exception as one line, with what to do for the common OS errors (in ``command``'s terms)."""
    import errno

    import yaml

    if isinstance(e, yaml.YAMLError):
        from rlhfkit.config.loader import yaml_error_line

        mark = getattr(e, "problem_mark", None)
        name = getattr(mark, "name", "") if mark is not None else ""
        text = f"{name}: {yaml_error_line(e)}" if name and not name.startswith("<") else yaml_error_line(e)
    elif isinstance(e, SyntaxError) and e.filename:
        text = f"{e.filename}:{e.lineno}: syntax error: {e.msg}"
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        if e.errno == errno.ENOSPC:
            text += f" (free some space, then rerun{_AFTER_A_FULL_DISK.get(command, '')})"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += f" (choose a writable {_OUTPUT_KEY.get(command, 'train.output_dir')})"
    elif _is_template_error(e):
        text = f"chat template: {type(e).__name__}: {e}"
    elif isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        text = "out of memory (lower train.micro_batch_size, or enable model.gradient_checkpointing)"
    else:
        text = str(e) or type(e).__name__
    stage = getattr(e, "pipeline_stage", "")  # set by `rlhfkit pipeline` on what a stage raised
    text = " ".join(f"{stage}: {text}".split() if stage else text.split())
    return text if len(text) <= 600 else text[:597] + "..."


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _main(argv: list[str]) -> int:
    envvars.check()  # an RLHFKIT_* switch with a value it does not take: one line, before anything runs
    if argv[:1] == ["make-data"]:  # its own argparse (argparse.REMAINDER drops leading --options)
        from rlhfkit.tasks.make_data import main as build_main

        return build_main(argv[1:]) or 0
    parser = build_parser()
    # overrides may also follow the flags (`rlhfkit sft -c x.yaml --resume optim.lr=1e-3`): argparse
    # takes one run of positionals, so the key=value words after a flag come back as extras
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:  # argparse's own error for what it does not know, named after the command
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "report":
        if len(args.runs) > 1 and not args.out:
            _command_parser(parser, "report").error("comparing several runs needs --out FILE")
        missing = [r for r in args.runs if not os.path.isdir(r)]
        if missing:
            raise FileNotFoundError(f"run directory not found: {missing[0]}")
        try:
            from rlhfkit.report import build_report
        except ConfigError as e:  # matplotlib missing
            print(f"rlhfkit report: error: {e}", file=sys.stderr)
            return 2
        print(build_report(args.runs, args.out))
        return 0
    if args.command == "merge":
        from rlhfkit.models.start import merge_adapter

        print(merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype, overwrite=args.overwrite))
        return 0
    if args.command == "pipeline":
        import yaml

        from rlhfkit.config.loader import yaml_error_line
        from rlhfkit.pipeline import run_pipeline

        try:
            if args.print_config:
                _print_stages(args.config, args.overrides)
                return 0
            _one_process("pipeline")
            run_pipeline(args.config, args.overrides)
        except yaml.YAMLError as e:  # the pipeline file's own syntax: name the file
            raise ConfigError(f"{args.config}: {yaml_error_line(e)}") from None
        return 0
    run_trainer(args.command, args.config, args.overrides, getattr(args, "resume", False),
                args.print_config or args.explain, args.explain, getattr(args, "overwrite", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
