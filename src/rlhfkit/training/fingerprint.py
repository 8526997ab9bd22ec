"""A run's fingerprint: its resolved config minus the settings that do not change what it computes
(`RESUMABLE_KEYS`), and the identity of its inputs (`identify`: data files by size and SHA-256,
model directories file by file). `rundir` compares a run with the one it would continue, and
`pipeline` a finished stage with its config now (`differences`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from rlhfkit.config import to_dict
from rlhfkit.data.sources import task_data_dir

RECORD_VERSION = 4
# From version 3 an adapter's identity holds its base's files ("base:..."), and a local hf: dataset
# directory is identified by its files: an older record's identity of either is compared as it was taken.
# From version 4 train.eval_every is in the config when a best checkpoint is kept (`flat_config`).
CONFIG_SINCE = {"train.eval_every": 4}
# Sources fingerprinted only from a record version on: an older record that lacks them is no difference.
SOURCES_SINCE = {"prompts.eval": 2, "reward.gold": 2, "gold": 2}
# Config keys left out of the fingerprint: how the run is driven, logged, checkpointed and laid
# out over processes, none of which changes the numbers it computes (micro_batch_size only
# splits the same global batch; a checkpoint resumes on any FSDP / ZeRO / DDP layout).
# train.select_best and select_best_mode are in: the restored best was chosen by them, and so is
# train.eval_every while either of those is set (`flat_config`).
RESUMABLE_KEYS = {
    "train.resume", "train.overwrite", "train.resume_mismatch_ok", "train.progress", "train.output_dir",
    "train.save_every", "train.keep_checkpoints", "train.log_every", "train.eval_every", "train.fsdp",
    "train.zero_stage", "train.micro_batch_size", "model.gradient_checkpointing",
}
# The run's length may change on resume (to continue a finished run for longer, or end it sooner):
# said in a warning, not refused; the learning-rate schedule then follows the new length.
LENGTH_KEYS = {"train.max_steps", "train.epochs", "iterations"}  # iterations: online DPO's steps
# Inputs compared by content rather than by the string in the config (a moved file is the same data).
DATA_KEYS = ("data.train", "data.eval", "data.chat_template", "prompts.train", "prompts.eval", "ptx.data")
# Models identified by their files as well as by name (a directory retrained in place is another model).
MODEL_KEYS = ("model.name", "dpo.reference", "critic_model", "reward.spec", "reward.gold", "scorer", "gold")
_FULL_HASH_BYTES = 64 << 20  # weight files up to this size are hashed whole; larger ones are sampled
# Weight files: a retrained model differs almost everywhere, so a large one is sampled. Every other
# file (data above all: a pair's labels swapped in place keeps the file's size) is hashed whole.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{"section.key": value}`` (an empty section is a value)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def flat_config(cfg: Any) -> dict[str, Any]:
    """The config as ``{"section.key": value}``, without `RESUMABLE_KEYS` and `DATA_KEYS`; with
    ``train.eval_every`` when ``train.select_best`` or early stopping is set, since the evaluated
    steps are then the candidates for the final model (and the steps at which a run may stop)."""
    flat = flatten(to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))
    out = {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS and k not in DATA_KEYS}
    if flat.get("train.select_best") or flat.get("train.early_stopping_patience"):
        out["train.eval_every"] = flat.get("train.eval_every")
    return out


def default_sources(cfg: Any) -> dict[str, str]:
    """The data and model specs of ``cfg`` whose identity is fingerprinted (`DATA_KEYS`, `MODEL_KEYS`),
    or those its own ``fingerprint_sources()`` names (`eval.config.EvalConfig`)."""
    declared = getattr(cfg, "fingerprint_sources", None)
    if callable(declared):
        return declared()
    flat = flatten(to_dict(cfg))
    out = {}
    for key in (*DATA_KEYS, *MODEL_KEYS):
        value = flat.get(key)
        if isinstance(value, str) and value:
            out[key] = value
        elif isinstance(value, list):  # data.train or reward.spec as a list of sources: each one identified
            for i, spec in enumerate(value):
                spec = spec.get("spec") if isinstance(spec, dict) else spec  # a {spec, weight, name} entry
                if isinstance(spec, str) and spec:
                    out[f"{key}[{i}]"] = spec
    return out


def fingerprint(cfg: Any, kind: str, sources: dict[str, str]) -> dict:
    config = flat_config(cfg)
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return {"version": RECORD_VERSION, "kind": kind, "created": round(time.time(), 3), "run_id": uuid.uuid4().hex,
            "config_sha256": hashlib.sha256(blob).hexdigest(), "config": config,
            "sources": {name: identify(spec) for name, spec in sorted(sources.items())}}


def identify(spec: str, _seen: frozenset = frozenset()) -> dict:
    """The identity of a data or model spec: files by size and digest, directories file by file
    (a run directory by its ``model/``; a LoRA adapter with its local base's files), ``task:NAME``
    by its shipped data, a local ``hf:`` dataset directory by its files, anything else (a hub id, hub
    data, a named template, a Python reward) by its name."""
    path = local_path(spec)
    if path is None:
        return {"spec": spec}
    if path.is_file():
        return {"spec": spec, "path": str(path.resolve()), "size": path.stat().st_size, "digest": file_digest(path)}
    files = {rel: {"size": p.stat().st_size, "digest": file_digest(p)} for rel, p in _files(path, depth=2)}
    base = _adapter_base(path)
    if base is not None and str(Path(base).resolve()) not in _seen:  # an adapter is its weights on its base's
        seen = _seen | {str(path.resolve())}
        files.update({f"base:{rel}": ident for rel, ident in (identify(base, seen).get("files") or {}).items()})
    return {"spec": spec, "path": str(path.resolve()), "files": files}


def _adapter_base(path: Path) -> str | None:
    """The local base model directory a LoRA adapter directory names (``adapter_config.json``)."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base and Path(base).expanduser().is_dir() else None


def _files(root: Path, depth: int) -> list[tuple[str, Path]]:
    """(relative name, path) of the files in ``root`` and its sub-directories down to ``depth``
    levels, hidden ones (temporary writes) left out."""
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file():
            out.append((p.name, p))
        elif p.is_dir() and depth > 1:
            out += [(f"{p.name}/{rel}", q) for rel, q in _files(p, depth - 1)]
    return out


def local_path(spec: str) -> Path | None:
    """The file or directory a data or model spec reads, when it is local and exists."""
    if spec.startswith("task:"):

        name, _, fname = spec[len("task:"):].partition("/")
        p = task_data_dir(name) / fname if fname else task_data_dir(name)
        return p if p.exists() else None
    if spec.startswith(("rm:", "pm:", "judge:")):
        spec = spec.partition(":")[2]
    elif spec.startswith("hf:"):  # hf:DIR[@config][:split], a dataset saved locally (a hub id is not a path)
        p = Path(spec[3:].partition(":")[0].partition("@")[0]).expanduser()
        return p if p.is_dir() else None
    elif spec.count(":") == 1 and spec.split(":")[0].endswith(".py"):  # file.py:function
        spec = spec.split(":")[0]
    p = Path(spec).expanduser()
    if not p.exists():
        return None
    if p.is_dir() and (p / "model").is_dir() and not (p / "config.json").is_file():
        p = p / "model"  # a run directory named for its model (rm:RUN_DIR)
    return p


def file_digest(path: Path, sampled: bool | None = None) -> str:
    """``sha256:HEX`` of the whole file; for a weight file (`WEIGHT_SUFFIXES`) above 64 MiB
    ``sampled-sha256:HEX`` of its size, first and last 4 MiB and 32 blocks of 256 KiB spread evenly
    between (a retrained model differs almost everywhere, and reading 12 MiB of a 500 MiB file is
    cheap). ``sampled``: the one form or the other, whatever the file."""
    size = path.stat().st_size
    if sampled is None:
        sampled = size > _FULL_HASH_BYTES and path.suffix.lower() in WEIGHT_SUFFIXES
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if not sampled:
            while block := f.read(1 << 20):
                h.update(block)
            return f"sha256:{h.hexdigest()}"
        h.update(str(size).encode())
        edge, block = 4 << 20, 256 << 10
        offsets = [0, *(edge + i * (size - 2 * edge - block) // 31 for i in range(32)), size - edge]
        for off in offsets:
            f.seek(off)
            h.update(f.read(edge if off in (0, size - edge) else block))
    return f"sampled-sha256:{h.hexdigest()}"


def well_formed(record) -> bool:
    """Whether a saved run record has the shape `differences` reads (a file edited by hand may not):
    a config mapping, and sources mapping each key to its {"spec", ...} identity."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return False
    sources = record.get("sources", {})
    return isinstance(sources, dict) and isinstance(record.get("version", 1), int) and all(
        isinstance(v, dict) and isinstance(v.get("spec"), str) for v in sources.values())


def differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """What differs between two fingerprints, one short phrase each. ``defaults`` (`flat_config` of
    the command's default config): a key the old record lacks (a run started before rlhfkit had
    the key) is no difference when the new value is its default, the behaviour the old run had."""
    diffs = []
    oc, nc, defaults = old.get("config", {}), new.get("config", {}), defaults or {}
    version = old.get("version", 1)
    for key in sorted(set(oc) | set(nc)):
        if key not in oc and key in defaults and nc.get(key) == defaults[key]:
            continue
        if key not in oc and version < CONFIG_SINCE.get(key, 1):
            continue  # recorded only from that version on
        if oc.get(key, "<unset>") != nc.get(key, "<unset>"):
            diffs.append(f"{key} {_short(oc.get(key, '<unset>'))} -> {_short(nc.get(key, '<unset>'))}")
    os_, ns = old.get("sources", {}), new.get("sources", {})
    for key in sorted(set(os_) | set(ns)):
        a, b = os_.get(key), ns.get(key)
        if a is None and version < SOURCES_SINCE.get(key.partition("[")[0], 1):
            continue
        if version < 3 and a is not None and b is not None and a["spec"].startswith("hf:") and "path" not in a:
            continue  # taken by name alone then
        if a is None or b is None:
            diffs.append(f"{key} {'added' if a is None else 'removed'}")
        elif "path" in a and "path" not in b and a["spec"] == b["spec"]:
            diffs.append(f"{key} {_short(b['spec'])}: not found any more")
        elif _content(a, version) != _content(_as_taken(b, a), version):
            sizes = f" (size {a['size']} -> {b['size']})" if "size" in a and "size" in b and a["size"] != b["size"] else ""
            diffs.append(f"{key} content differs{sizes}" if "path" in a and "path" in b else
                         f"{key} {_short(a['spec'])} -> {_short(b['spec'])}")
    return diffs


def _as_taken(new: dict, old: dict) -> dict:
    """The new identity with each file's digest taken as the old record's was, sampled or whole
    (a data file over 64 MiB was sampled by older versions and is hashed whole now)."""
    if "path" not in new:
        return new
    root = Path(new["path"])
    if "digest" in new and "digest" in old:
        return {**new, "digest": _digest_as(root, new["digest"], old)}
    if isinstance(new.get("files"), dict) and isinstance(old.get("files"), dict):
        taken = old["files"]
        files = {rel: ident if rel.startswith("base:") else  # a base's files lie under the base, not here
                 {**ident, "digest": _digest_as(root / rel, ident.get("digest"), taken.get(rel))}
                 for rel, ident in new["files"].items()}
        return {**new, "files": files}
    return new


def _digest_as(path: Path, new: Any, old: Any) -> Any:
    old = old.get("digest") if isinstance(old, dict) else old
    if not isinstance(old, str) or not isinstance(new, str):
        return new
    sampled = old.startswith("sampled-")
    if sampled == new.startswith("sampled-") or not path.is_file():
        return new
    return file_digest(path, sampled=sampled)


def _content(ident: dict, version: int = RECORD_VERSION) -> Any:
    if "digest" in ident:
        return ident["digest"]
    if "files" in ident:
        files = ident["files"]
        return files if version >= 3 else {k: v for k, v in files.items() if not k.startswith("base:")}
    return ident["spec"]


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[:n - 3] + "..."
