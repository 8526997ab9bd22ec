"""What a run ran on: library versions, hardware, and the time each pipeline stage took.

    from rlhfkit.runinfo import environment, write_run_info
    environment()                      # -> dict, cheap: reads package metadata and /proc
    write_run_info(out_dir, stages)    # <out_dir>/run_info.json, read by `rlhfkit report`

Versions come from installed package metadata (nothing is imported for them); GPU details are
read from torch only when torch is already imported, else from the NVIDIA driver's /proc files.
Anything that cannot be found is None (or left out), never an exception.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ["rlhfkit", "torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "safetensors",
            "tokenizers", "numpy"]


def package_versions(names: list[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_gb() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2  # kB -> GB (GiB)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (AttributeError, ValueError, OSError):
        return None


def gpus() -> list[str]:
    """'NAME (MEM GB)' per visible GPU. Uses torch only if the caller already imported it
    (importing torch here would cost seconds); else the NVIDIA driver's /proc entries."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [f"{torch.cuda.get_device_name(i)} "
                        f"({torch.cuda.get_device_properties(i).total_memory / 1024**3:.0f} GB)"
                        for i in range(torch.cuda.device_count())]
            return []
        except Exception:  # a broken driver must not break the run's bookkeeping
            pass
    out = []
    root = Path("/proc/driver/nvidia/gpus")
    for info in sorted(root.glob("*/information")) if root.is_dir() else []:
        fields = dict(line.split(":", 1) for line in _read(str(info)).splitlines() if ":" in line)
        out.append(fields.get("Model", "NVIDIA GPU").strip())
    return out


def git_commit(path: Path = Path(__file__).resolve().parent) -> str | None:
    """The source checkout's commit (with '+dirty' for uncommitted changes), None if not a checkout."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(path), *a], capture_output=True, text=True, timeout=5)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Python, library versions, torch's CUDA build (if torch is loaded), hardware, commit, time."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "packages": package_versions(),
           "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": usable, "ram_gb": ram_gb(),
                        "gpus": gpus()},
           "git_commit": git_commit(),
           "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = {"cuda": getattr(torch.version, "cuda", None), "threads": torch.get_num_threads()}
    return env


def stage_seconds(out_dir: Path, name: str) -> float | None:
    """Wall time of a finished stage, from the ``DONE`` file the pipeline writes."""
    try:
        return float(json.loads((out_dir / name / "DONE").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_info(out_dir: str | Path, stages: list[tuple[str, str]]) -> Path:
    """``<out_dir>/run_info.json``: the environment and each (name, kind) stage's wall time.
    Stages finished by an earlier invocation keep the time their ``DONE`` file recorded."""
    out_dir = Path(out_dir)
    info = {"environment": environment(),
            "stages": [{"name": n, "kind": k, "seconds": stage_seconds(out_dir, n)} for n, k in stages]}
    path = out_dir / "run_info.json"
    tmp = path.with_name(".run_info.json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)
    return path
