"""Where one decode step of the rollout engine goes, part by part, against each part's roofline.

    .venv/bin/python benchmarks/profile_decode.py [--batches 8,16] [--context 24] [--steps 12]
    .venv/bin/python benchmarks/profile_decode.py --tiny     # a tiny random model: checks the script runs

Prefills b prompts of the sentiment task as `rollout.engine.generate` does (weights packed for the
call, preallocated KV cache), decodes `--context` tokens, then runs `--steps` more decode steps
(the model's forward plus the sampler) twice: once plain, timed (wall ms per step), once under
`torch.profiler`, with a named range around every module of interest (each Linear by name, the
norms, the rotary table, attention, MLP), the KV-cache update, the mask building and the sampler.
Each operator is attributed to its innermost range; "python / dispatch" is the plain step time
less the time of every operator (a lower bound: the profiler inflates operator times a little).
Each part's roofline is the larger of its bytes (weights, KV cache read) / the copy bandwidth and
its FLOPs / the matmul peak, both measured as in `bench_rollout.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, matmul_peak_gflops, memory_bandwidth_gbs, tiny_model_dir  # noqa: E402

from rlhfkit.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer  # noqa: E402
from rlhfkit.rollout import engine, llama_decode, load_prompt_items  # noqa: E402
from rlhfkit.rollout.sampler import Sampler  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
BLOCKS = {"RMSNorm": "norms", "RotaryEmbedding": "rotary table", "Attention": "attention other",
          "MLP": "mlp other (silu, mul)"}


def _label(name: str, module) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, torch.nn.Linear):
        return f"linear {leaf}" if leaf in LINEARS else "linear other"
    cls = type(module).__name__
    return next((v for k, v in BLOCKS.items() if cls.endswith(k)), None)


def instrument(model):
    """Named profiler ranges around modules; returns a function that removes them."""
    handles, open_ranges = [], []
    for name, module in model.named_modules():
        label = _label(name, module)
        if label is None:
            continue

        def pre(mod, args, label=label):
            rf = record_function(label)
            rf.__enter__()
            open_ranges.append(rf)

        def post(mod, args, out):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return lambda: [h.remove() for h in handles]


@contextlib.contextmanager
def ranged(obj, attr: str, label: str):
    """Wrap obj.attr (a function) in a profiler range for the duration."""
    orig = getattr(obj, attr)

    def wrapped(*a, **k):
        with record_function(label):
            return orig(*a, **k)

    setattr(obj, attr, wrapped)
    try:
        yield
    finally:
        setattr(obj, attr, orig)


def attribute(prof, lean_names: dict | None = None) -> dict[str, float]:
    """Self CPU ms of every operator summed by its innermost named range. Operators outside any
    range: by `lean_names` (the lean path: weight shape -> linear name) and operator name."""
    names = set(BLOCKS.values()) | {f"linear {n}" for n in LINEARS} | {
        "linear other", "kv cache update", "mask", "sampler", "attention sdpa", "rotary table"}
    out: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name in names or ev.name.startswith("ProfilerStep"):
            continue
        label, p = None, ev.cpu_parent
        if ev.name == "aten::scaled_dot_product_attention" or _under(ev, "aten::scaled_dot_product_attention"):
            label = "attention sdpa"
        while label is None and p is not None:
            if p.name in names:
                label = p.name
            p = p.cpu_parent
        if label is None and lean_names is not None:
            top = ev
            while top.cpu_parent is not None:
                top = top.cpu_parent
            label = _lean_label(top, lean_names)
        out[label or "model ops outside modules (embedding, residual adds, ...)"] += ev.self_cpu_time_total / 1e3
    return out


def _lean_label(top, lean_names: dict) -> str:
    if top.name == "mkldnn::_linear_pointwise" or top.name == "aten::linear":
        return lean_names.get(tuple(top.input_shapes[1]), "linear other")
    if top.name in ("aten::matmul", "aten::softmax", "aten::bmm"):
        return "attention sdpa"  # the lean path's two products and softmax
    if top.name == "aten::rms_norm":
        return "norms"
    if top.name in ("aten::zeros", "aten::masked_fill_", "aten::eq", "aten::slice"):
        return "mask"
    return "elementwise (rotary, residual, silu, scale)"


def _under(ev, name: str) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        p = p.cpu_parent
    return False


class Decoder:
    """b prompts prefilled as the engine does; `step()` = sampler + one decode forward."""

    def __init__(self, model, rows, pad_token_id, room: int, decoder=None, seed: int = 0):
        self.model, self.keep, self.decoder = model, {"logits_to_keep": 1}, decoder
        self.logits, self.cache, mask = engine._prefill(model, rows, pad_token_id, torch.device("cpu"),
                                                        self.keep, extra=room, decoder=decoder)
        self.K = mask.shape[1]
        self.attn = torch.cat([mask, mask.new_ones(len(rows), room)], dim=1)
        self.pos = mask.sum(-1, keepdim=True)
        self.sampler = Sampler(1.0, 1.0, 0, torch.Generator().manual_seed(seed))
        self.t = 0

    def step(self) -> None:
        with record_function("sampler"):
            tok, _ = self.sampler(self.logits, True)
        self.logits = engine.decode_step(self.model, self.decoder, tok, self.attn[:, :self.K + self.t + 1],
                                         self.pos + self.t, self.cache, self.keep)
        self.t += 1


LEAN_MERGED = {"linear q_proj": "linear qkv", "linear k_proj": "linear qkv", "linear v_proj": "linear qkv",
               "linear gate_proj": "linear gate, up", "linear up_proj": "linear gate, up"}


def rooflines(model, b: int, ctx: int, bw: float, peak: float, lean: bool) -> dict[str, float]:
    """ms per decode step of each part at its roofline: max(bytes / bandwidth, FLOPs / peak)."""
    params: dict[str, int] = defaultdict(int)
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            label = _label(name, m)
            params[LEAN_MERGED.get(label, label) if lean else label] += m.weight.numel()
    out = {k: 1e3 * max(4 * n / bw, 2 * n * b / peak) for k, n in params.items()}
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_bytes = 4 * b * ctx * 2 * c.num_hidden_layers * c.num_key_value_heads * hd
    attn_flops = b * ctx * 4 * c.num_hidden_layers * c.num_attention_heads * hd
    out["attention sdpa"] = 1e3 * max(kv_bytes / bw, attn_flops / peak)
    return out


def _lean_shapes(model) -> dict[tuple, str]:
    """(out, in) of the lean decoder's fused weights -> their names."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    H, nh, nkv, inter = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    return {((nh + 2 * nkv) * hd, H): "linear qkv", (H, nh * hd): "linear o_proj", (inter, H): "linear gate, up",
            (H, inter): "linear down_proj", (c.vocab_size, H): "linear lm_head"}


def profile_batch(model, tok, prompts, b: int, context: int, steps: int, bw: float, peak: float) -> list[dict]:
    rows = [it.ids for it in prompts[:b]]
    room = context + 2 * steps + 4
    with torch.inference_mode(), engine.decode_weights(model, b, room) as decoder:
        dec = Decoder(model, rows, tok.pad_token_id, room, decoder)
        for _ in range(context):
            dec.step()
        t = time.perf_counter()
        for _ in range(steps):
            dec.step()
        wall = (time.perf_counter() - t) / steps * 1e3
        ctx = dec.K + dec.t
        layer_cls = type(dec.cache.layers[0])
        base_mod = sys.modules[type(model.get_base_model() if hasattr(model, "get_base_model") else model).__module__]
        remove = instrument(model)
        try:
            with ranged(layer_cls, "update", "kv cache update"), ranged(base_mod, "create_causal_mask", "mask"), \
                    (ranged(decoder, "rotary", "rotary table") if decoder is not None else contextlib.nullcontext()), \
                    profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(steps):
                    dec.step()
        finally:
            remove()
    parts = {k: v / steps for k, v in attribute(prof, _lean_shapes(model) if decoder is not None else None).items()}
    roof = rooflines(model, b, ctx, bw * 1e9, peak * 1e9, decoder is not None)
    parts["python / dispatch (step less operators)"] = wall - sum(parts.values())
    out = [{"part": k, "ms/step": v, "% of step": 100 * v / wall,
            "roofline ms": roof.get(k, 0.0), "% of its roofline": 100 * roof[k] / v if k in roof and v > 0 else None}
           for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]
    total_roof = sum(roof.values())
    path = "lean" if decoder is not None else "forward"
    out.append({"part": f"step ({path}, batch {b}, context {ctx})", "ms/step": wall, "% of step": 100.0,
                "roofline ms": total_roof, "% of its roofline": 100 * total_roof / wall})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--context", type=int, default=24, help="decode steps before the measured ones")
    ap.add_argument("--steps", type=int, default=12, help="measured decode steps (plain, then profiled)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--decode", choices=["lean", "forward"], default="lean",
                    help="lean: the engine's default (`rollout.llama_decode`); forward: the model's own forward")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model: checks the script runs")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.context, args.steps = tiny_model_dir(), 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    llama_decode.LEAN_DECODE = args.decode == "lean"
    bw = memory_bandwidth_gbs(64 if args.tiny else 256)
    peak = matmul_peak_gflops(256 if args.tiny else 2048)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model).eval()
    prompts, _ = load_prompt_items("task:sentiment", tok, max_prompt_length=128)
    print(f"memory bandwidth (copy, read + write): {bw:.1f} GB/s | fp32 matmul peak: {peak:.1f} GFLOP/s | "
          f"{torch.get_num_threads()} threads")
    for b in (int(x) for x in args.batches.split(",")):
        rows = profile_batch(model, tok, prompts, b, args.context, args.steps, bw, peak)
        print()
        print(fmt_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
