"""Reading a run directory: stage folders, metric series, evaluation results, configs, timings.

Everything here tolerates partial runs (a stage still running, a line cut by a kill, a file a
stage did not write): what is missing is simply absent from the result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file; a line that is not one (cut by a kill, or not a record) is
    skipped, the rest is fine."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def read_yaml(path: Path) -> dict:
    """A YAML mapping (safe loader: tags that would build objects are refused); invalid YAML raises
    a yaml error whose mark names the file, and a file that is not a mapping reads as {}."""
    with open(path, encoding="utf-8", errors="replace") as f:
        out = yaml.safe_load(f)
    return out if isinstance(out, dict) else {}


def read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return out if isinstance(out, dict) else {}


def why_unreadable(path: Path, parse) -> str | None:
    """Why a file that is there does not read with ``parse`` (the error's first line); None when
    it reads, or is not there."""
    if not path.is_file():
        return None
    try:
        parse(path)
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def _json_parse(path: Path) -> None:
    json.loads(path.read_text())


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over the rows that logged a finite number for it."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r.get("step", len(xs)))
            ys.append(float(v))
    return xs, ys


def metric_keys(rows: list[dict]) -> list[str]:
    """Every numeric key of a stage's metrics, in first-logged order."""
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k)
    return list(keys)


@dataclass
class Stage:
    """One stage folder of a run (or a single-stage run folder itself)."""

    name: str
    kind: str
    path: Path
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl
    config: dict = field(default_factory=dict)  # the resolved <kind>_config.yaml
    config_text: str = ""
    seconds: float | None = None
    seconds_source: str = ""  # "pipeline", "DONE file" or "log timestamps"
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # files of the stage that did not read, and why

    @property
    def model(self) -> str:
        """What the stage trained or evaluated, as its config names it."""
        m = self.config.get("model")
        if isinstance(m, dict) and m.get("name"):
            return str(m["name"])
        if self.config.get("policies"):
            pols = ", ".join(str(p) for p in self.config["policies"])
            return f"{pols} vs baseline {self.config.get('baseline', '?')}"
        return ""


def pipeline_kinds(run: Path) -> dict[str, str]:
    """Stage name -> kind, in the order of the run's ``pipeline.yaml`` (none for a single command's run)."""
    pipe = run / "pipeline.yaml"
    if not pipe.is_file() or why_unreadable(pipe, read_yaml):  # a damaged one is a warning of `run_warnings`
        return {}
    stages = read_yaml(pipe).get("stages")
    stages = stages if isinstance(stages, list) else []
    return {name: kind for name, kind in ((s.get("name") or s.get("kind"), s.get("kind", "")) for s in stages
                                          if isinstance(s, dict)) if isinstance(name, str) and isinstance(kind, str)}


def _load_stage(name: str, kind: str, path: Path, recorded: dict[str, float]) -> Stage:
    st = Stage(name=name, kind=kind, path=path, rows=read_jsonl(path / "metrics.jsonl"))
    cfgs = sorted(path.glob("*_config.yaml"))
    if cfgs:
        st.config_text = cfgs[0].read_text(errors="replace")
        st.kind = st.kind or cfgs[0].name[: -len("_config.yaml")]
        why = why_unreadable(cfgs[0], read_yaml)
        if why:
            st.unreadable.append((cfgs[0], why))
        else:
            st.config = read_yaml(cfgs[0])
    done = read_json(path / "DONE") if (path / "DONE").is_file() else {}
    times = [r["time"] for r in st.rows if isinstance(r.get("time"), (int, float))]
    if name in recorded:
        st.seconds, st.seconds_source = recorded[name], "pipeline"
    elif isinstance(done.get("seconds"), (int, float)):
        st.seconds, st.seconds_source = float(done["seconds"]), "DONE file"
    elif len(times) > 1:  # lower bound: model loading before the first log line is not in it
        st.seconds, st.seconds_source = max(times) - min(times), "log timestamps"
    return st


def is_stage_dir(path: Path) -> bool:
    """A folder a command wrote into: its resolved config (written first), metrics or eval results."""
    return any(path.glob("*_config.yaml")) or (path / "metrics.jsonl").is_file() or any(path.glob("eval*.json"))


def run_warnings(name: str, run: Path) -> list[dict]:
    """An ``unreadable`` warning for a run's own ``pipeline.yaml`` or ``run_info.json`` that is
    there but does not read: the stage order, the stages not started, the stage times and the
    environment it holds are not shown."""
    out = []
    for file, parse, lost in (("pipeline.yaml", read_yaml, "the stage order and the stages not started"),
                              ("run_info.json", _json_parse, "stage times and the software and hardware")):
        why = why_unreadable(run / file, parse)
        if why:
            out.append({"run": name, "stage": "", "kind": "unreadable", "path": str(run / file),
                        "message": f"{run / file} could not be read ({why}); {lost} are not shown."})
    return out


def load_stages(run: Path) -> list[Stage]:
    """Stage folders in pipeline order (then any other folder a command wrote into)."""
    run = Path(run).resolve()  # `rlhfkit report .` names the stage by its folder, not ""
    info = read_json(run / "run_info.json")
    recorded = {s["name"]: s["seconds"] for s in info.get("stages") or []
                if isinstance(s, dict) and isinstance(s.get("seconds"), (int, float))}
    if is_stage_dir(run):
        return _with_nested([_load_stage(run.name, "", run, recorded)], recorded)
    kinds = pipeline_kinds(run)
    dirs = [run / n for n in kinds if (run / n).is_dir()]
    for p in sorted(run.iterdir()) if run.is_dir() else []:
        if p.is_dir() and p not in dirs and is_stage_dir(p):
            dirs.append(p)
    return _with_nested([_load_stage(p.name, kinds.get(p.name, ""), p, recorded) for p in dirs], recorded)


def _with_nested(stages: list[Stage], recorded: dict[str, float]) -> list[Stage]:
    """Each DPO stage followed by its SFT phase (``sft_first``: ``<stage>/sft``), a stage of its own,
    so that its curves are drawn and a held-out metric that fell there is flagged as anywhere."""
    out = []
    for st in stages:
        out.append(st)
        if st.kind == "dpo" and is_stage_dir(st.path / "sft"):
            out.append(_load_stage(f"{st.name}/sft", "sft", st.path / "sft", recorded))
    return out


# --------------------------------------------------------------------------- evaluation results

def _judge_names(m: dict) -> list[str]:
    return [j for j, w in (m.get("win_rate") or {}).items() if isinstance(w, dict)]


def load_eval(path: Path) -> dict:
    """``eval_results.json`` (+ its ``samples-*.jsonl``) -> what the report shows.

    policies: name -> the model's entry as written (baseline first); judges: the pairwise judges;
    length_reward: "name (judge)" -> [(characters, score)]; samples: side-by-side rows.
    """
    ev = json.loads(path.read_text())
    _check_eval_shape(ev)
    policies = {"baseline": ev.get("baseline") or {}, **(ev.get("policies") or {})}
    judges: list[str] = []
    for m in policies.values():
        judges += [j for j in _judge_names(m) if j not in judges]
    samples_by = {name: read_jsonl(path.parent / f"samples-{name}.jsonl") for name in policies}
    length_reward = {}
    for name, recs in samples_by.items():
        key = next((k for k in ("gold", "proxy") if recs and k in recs[0]), None)
        if key:
            length_reward[f"{name} ({key})"] = [(len(r["response"]), r[key]) for r in recs
                                                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
                                                and isinstance(r.get("response"), str)]
    cfg_path = path.parent / "eval_config.yaml"
    cfg = read_yaml(cfg_path) if cfg_path.is_file() else {}
    kinds = {j: scorer_kind(cfg.get(j)) for j in ("gold", "proxy") if isinstance(cfg, dict)}
    return {"policies": policies, "judges": judges, "length_reward": length_reward, "raw": ev, "kinds": kinds,
            "samples": side_by_side(samples_by, int(ev.get("samples_per_prompt") or 1))}


def _check_eval_shape(ev: Any) -> None:
    """What the report reads of an eval_results.json has the shape `rlhfkit eval` writes: raises
    ValueError (the file is then named as unreadable) for one edited into another shape."""
    def finite(v: Any, where: str) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where}: {v} (rlhfkit writes null)")
        for k, sub in (v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()):
            finite(sub, f"{where}.{k}")

    if not isinstance(ev, dict) or not isinstance(ev.get("policies") or {}, dict):
        raise ValueError("not an evaluation's results (a mapping with a mapping of policies)")
    finite(ev, "results")
    for name, m in {"baseline": ev.get("baseline") or {}, **(ev.get("policies") or {})}.items():
        if not isinstance(m, dict):
            raise ValueError(f"policies.{name}: {m!r} is not a model's results")
        for judge, w in (m.get("win_rate") or {}).items() if isinstance(m.get("win_rate") or {}, dict) else [("", 0)]:
            if w is not None and not (isinstance(w, dict) and all(isinstance(w.get(k), (int, float))
                                                                  for k in ("win_rate", "ci_low", "ci_high"))):
                raise ValueError(f"policies.{name}.win_rate.{judge}: not a win rate with its interval")


def scorer_kind(spec: Any) -> str | None:
    """What a reward / judge spec is, in words: ``rm:DIR`` a reward model, ``file.py:fn`` a reward
    function, ... (None when there is no spec)."""
    if isinstance(spec, dict):
        spec = spec.get("spec")
    if isinstance(spec, list):
        return "weighted rewards" if len(spec) > 1 else scorer_kind(spec[0]) if spec else None
    if not isinstance(spec, str) or not spec:
        return None
    prefix = spec.split(":", 1)[0]
    return {"rm": "reward model", "pm": "preference model", "judge": "LLM judge",
            "annotator": "simulated annotator", "task": "task reward"}.get(prefix, "reward function")


def side_by_side(samples_by: dict[str, list[dict]], per_prompt: int) -> list[dict]:
    """One row per prompt: its text and every model's first response (and score)."""
    names = [n for n, recs in samples_by.items() if recs]
    if len(names) < 2:
        return []
    rows = []
    for i in range(0, min(len(samples_by[n]) for n in names), max(1, per_prompt)):
        prompt = samples_by[names[0]][i].get("prompt")
        row = {"prompt": prompt if isinstance(prompt, str) else "", "responses": {}}
        for n in names:
            rec = samples_by[n][i]
            sc, text = rec.get("gold", rec.get("proxy")), rec.get("response")
            row["responses"][n] = (text if isinstance(text, str) else "",
                                   sc if isinstance(sc, (int, float)) and math.isfinite(sc) else None)
        rows.append(row)
    return rows


def find_evals(stages: list[Stage]) -> tuple[list[tuple[Stage, Path, dict]], list[tuple[Stage, Path, str]]]:
    """(the evaluations that read, (stage, path, why) of those that do not): an unreadable file
    leaves the rest of the report standing, and is named by a warning."""
    found, unreadable = [], []
    for st in stages:
        for p in sorted(st.path.glob("eval*.json")):
            if p.name.endswith("_run.json"):  # eval_run.json: the record of what was evaluated, no results
                continue
            try:
                found.append((st, p, load_eval(p)))
            except (OSError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
                unreadable.append((st, p, f"{type(e).__name__}: {e}"))
    return found, unreadable


def training_samples(st: Stage, limit: int = 6) -> tuple[int | None, list[dict]]:
    """The last logged step's (prompt, response, score, eos) samples of a policy-gradient stage."""
    recs = [r for r in read_jsonl(st.path / "samples.jsonl") if isinstance(r.get("response"), str)]
    if not recs:
        return None, []
    last = max(r.get("step", 0) for r in recs)
    return last, [r for r in recs if r.get("step", 0) == last][:limit]


def config_value(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
