"""Reward heads applied to every response token, then pooled (docs/results_rm.md, "A head on every token").

    python benchmarks/rm_token_heads.py features --model runs/sft/model --data FILE... --out runs/tokf/NAME.pt
    python benchmarks/rm_token_heads.py heads --train runs/tokf/train.pt --eval runs/tokf/eval.pt --layers 0+8
    python benchmarks/rm_token_heads.py sizes --train runs/tokf/train.pt --eval runs/tokf/eval.pt --sizes 576,1152,2304

A linear head commutes with the pooling, so a mean-pooled linear RM scores a reply by one linear
function of its mean feature. A small MLP applied at every response token, r = pool_t mlp(h_t),
scores each token nonlinearly first, as a word list does (the gold judge, VADER, sums the
valence its lexicon gives each word). `features` caches every response token's features at
LAYERS (each through the final norm, as a head on the first N layers reads them; the backbone is
cut to the deepest one) for the pairs of the given files, in order. `heads` fits, on the training
pairs: the linear probe on the mean- and the sum-pooled features (L2 by cross-validation, the
one-standard-error and the best-accuracy rule), and
the per-token MLP with mean and with sum pooling, its width, weight decay and epochs picked on a
fifth of the training prompts held out, then refitted on all pairs from several seeds. `sizes`
refits the chosen MLP on the first n training pairs, next to the linear probe (best-accuracy
rule), and the seeds' heads averaged. Scores are on the held-out pairs, with rm_study's intervals
(a bootstrap over prompts).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from rlhfkit.algos.probe import fit_bt_probe
from rlhfkit.data import PreferenceCollator, load_preference, tokenize_dataset
from rlhfkit.models import backbone_and_head, keep_lower_layers, load_scalar_model, load_tokenizer
from rlhfkit.models import position_ids_from_mask

from rm_data import fmt, pair_metrics, read_rows

LAYERS = (0, 8)  # 0: the token embeddings through the final norm (a bag of words); 8: the shipped RM's depth
GRID = {"hidden": (16, 64), "wd": (0.01, 0.3), "epochs": tuple(range(1, 9))}
SUM_SCALE = 40.0  # a sum over ~40 response tokens, scaled to the size of a mean for the optimiser
L2_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0)


# --------------------------------------------------------------------------- per-token features

@torch.no_grad()
def extract(model_dir: str, datas: list[str], out: str, layers=LAYERS, micro_batch: int = 8,
            max_length: int = 160) -> dict:
    """{"tok": {layer: [[chosen (n_c, H), rejected (n_r, H)] per pair]} (fp16, response tokens
    only), gold scores, prompts}, saved to `out`."""
    tok = load_tokenizer(model_dir)
    rows = [r for d in datas for r in read_rows(d)]
    feats, _ = tokenize_dataset(tok, [e for d in datas for e in load_preference(d)], "preference", max_length, "error")
    model = load_scalar_model(model_dir, pad_token_id=tok.pad_token_id).eval()
    depth = max(max(layers), 1)
    keep_lower_layers(model, depth)
    backbone, _ = backbone_and_head(model)
    collate = PreferenceCollator(tok.pad_token_id)
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["prompt_ids"]) - max(
        len(feats[i]["chosen_ids"]), len(feats[i]["rejected_ids"])))
    store = {layer: [[None, None] for _ in feats] for layer in layers}
    t0 = time.perf_counter()
    for s in range(0, len(order), micro_batch):
        idx = order[s:s + micro_batch]
        b = collate([feats[i] for i in idx])
        ids, mask = b["input_ids"], b["attention_mask"]
        o = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     output_hidden_states=True, use_cache=False)
        keep = b["loss_mask"].bool() & mask.bool()  # (2B, T): chosen rows, then rejected
        for layer in layers:
            # the last layer's output comes normed as last_hidden_state; the others through the same norm
            h = o.last_hidden_state if layer == depth else backbone.norm(o.hidden_states[layer])
            for r in range(ids.shape[0]):
                store[layer][idx[r % len(idx)]][r // len(idx)] = h[r][keep[r]].half().clone()
        if (s // micro_batch) % 40 == 0:
            print(f"  {s + len(idx)}/{len(order)} pairs, {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"tok": store, "gold_c": torch.tensor([r["gold_chosen"] for r in rows]),
              "gold_r": torch.tensor([r["gold_rejected"] for r in rows]), "prompts": [r["prompt"] for r in rows],
              "model": model_dir, "data": datas, "seconds": time.perf_counter() - t0}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, out)
    return result


class TokenPairs:
    """Every response token of N pairs as one (n_tokens, D) matrix, standardised (with the given
    mean and spread, or the matrix's own); response 2i is pair i's chosen reply, 2i + 1 its rejected."""

    def __init__(self, cache: dict, layers: tuple[int, ...], stats: tuple | None = None):
        per_layer = [[t for pair in cache["tok"][layer] for t in pair] for layer in layers]
        self.x = torch.cat([torch.cat(ts).float() for ts in per_layer], 1)
        self.count = torch.tensor([len(t) for t in per_layer[0]])
        self.offset = torch.cat([torch.zeros(1, dtype=torch.long), self.count.cumsum(0)])
        self.mu, self.sd = stats or (self.x.mean(0), self.x.std(0).clamp_min(1e-6))
        self.x = (self.x - self.mu) / self.sd
        self.n = len(self.count) // 2

    def pooled(self, pool: str) -> torch.Tensor:
        """(N, 2, D) per-response sums or means of the standardised features."""
        seg = torch.repeat_interleave(torch.arange(2 * self.n), self.count)
        s = torch.zeros(2 * self.n, self.x.shape[1]).index_add_(0, seg, self.x)
        return (s / self.count[:, None] if pool == "mean" else s).view(self.n, 2, -1)

    def margins(self, net: torch.nn.Module, pairs: torch.Tensor, pool: str) -> torch.Tensor:
        """(len(pairs),) r(chosen) - r(rejected) with r = pool over tokens of net(token)."""
        resp = torch.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)
        rows = torch.cat([torch.arange(self.offset[r], self.offset[r + 1]) for r in resp.tolist()])
        seg = torch.repeat_interleave(torch.arange(len(resp)), self.count[resp])
        s = torch.zeros(len(resp)).index_add(0, seg, net(self.x[rows]).squeeze(-1))
        s = s / self.count[resp] if pool == "mean" else s / SUM_SCALE
        return (s[0::2] - s[1::2])


def fit_token_mlp(data: TokenPairs, pairs: torch.Tensor, hidden: int, wd: float, epochs: int, pool: str,
                  seed: int = 0, lr: float = 1e-3, batch: int = 32, val: torch.Tensor | None = None):
    """A one-hidden-layer MLP (GELU) on each token, pooled, fitted with the Bradley-Terry loss by
    AdamW over `pairs`; with `val`, also the accuracy on those pairs after each epoch."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(data.x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        perm = pairs[torch.randperm(len(pairs), generator=g)]
        for s in range(0, len(perm), batch):
            loss = torch.nn.functional.softplus(-data.margins(net, perm[s:s + batch], pool)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val is not None:
            with torch.no_grad():
                history.append(float((data.margins(net, val, pool) > 0).float().mean()))
    return net.eval(), history


def prompt_split(prompts: list[str], share: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) pair indices, `share` of the distinct prompts held out with all their pairs."""
    uniq = list(dict.fromkeys(prompts))
    held = {uniq[i] for i in torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))[
        :int(len(uniq) * share)].tolist()}
    return (torch.tensor([i for i, p in enumerate(prompts) if p not in held]),
            torch.tensor([i for i, p in enumerate(prompts) if p in held]))


# --------------------------------------------------------------------------- tables

def _row(rows: list, held: dict, name: str, margins: torch.Tensor, **extra) -> dict:
    rows.append({"name": name, **pair_metrics(margins.double(), held["gold_c"], held["gold_r"], held["prompts"]),
                 **extra})
    print(f"{name:46s} {fmt(rows[-1])}  {extra}", flush=True)
    return rows[-1]


def choose(data: TokenPairs, prompts: list[str], pool: str, grid: dict = GRID) -> dict:
    """The MLP's width, weight decay and epochs with the best accuracy on a fifth of the training
    prompts held out (each setting fitted once for max(epochs) epochs, read after every epoch)."""
    fit, val = prompt_split(prompts)
    best = None
    for hidden, wd in itertools.product(grid["hidden"], grid["wd"]):
        _, history = fit_token_mlp(data, fit, hidden, wd, max(grid["epochs"]), pool, val=val)
        for epochs in grid["epochs"]:
            if best is None or history[epochs - 1] > best["val"]:
                best = {"hidden": hidden, "wd": wd, "epochs": epochs, "val": history[epochs - 1]}
        print(f"  {pool} hidden {hidden} wd {wd}: validation {[round(a, 3) for a in history]}", flush=True)
    return best


def head_table(train: dict, held: dict, layers: tuple[int, ...], seeds: int = 5, grid: dict = GRID) -> list[dict]:
    """The linear probes and the per-token MLPs of the module docstring, scored on `held`."""
    data = TokenPairs(train, layers)
    test = TokenPairs(held, layers, (data.mu, data.sd))
    rows, name = [], "+".join(map(str, layers))
    for pool, rule in itertools.product(("mean", "sum"), ("one_se", "best")):
        t, h = data.pooled(pool), test.pooled(pool)
        w, info = fit_bt_probe((t[:, 0] - t[:, 1]).double(), l2_grid=L2_GRID, rule=rule)
        _row(rows, held, f"linear probe, layer {name}, {pool}, {rule}", (h[:, 0] - h[:, 1]).double() @ w,
             l2=info["l2"])
    for pool in ("mean", "sum"):
        cfg = choose(data, train["prompts"], pool, grid)
        every = torch.arange(test.n)
        margins = []
        for seed in range(seeds):
            net, _ = fit_token_mlp(data, torch.arange(data.n), cfg["hidden"], cfg["wd"], cfg["epochs"], pool, seed=seed)
            with torch.no_grad():
                margins.append(test.margins(net, every, pool))
            _row(rows, held, f"token MLP, layer {name}, {pool}, seed {seed}", margins[-1], config=cfg)
        accs = [r["acc"] for r in rows[-seeds:]]
        print(f"  {seeds} seeds: accuracy {sum(accs) / seeds:.3f} ({min(accs):.3f}-{max(accs):.3f})", flush=True)
        _row(rows, held, f"token MLP, layer {name}, {pool}, {seeds} seeds averaged",
             torch.stack([m / m.std().clamp_min(1e-12) for m in margins]).mean(0), config=cfg)
    return rows


def size_table(train: dict, held: dict, layers: tuple[int, ...], sizes: list[int], cfg: dict, pool: str,
               seeds: int = 5) -> list[dict]:
    """The MLP of `cfg` refitted on the first n training pairs for each n: mean and range over
    seeds, and the seeds' heads averaged (an ensemble: the mean of their margins)."""
    data = TokenPairs(train, layers)
    test = TokenPairs(held, layers, (data.mu, data.sd))
    out = []
    for n in sizes:
        runs, margins = [], []
        for seed in range(seeds):
            net, _ = fit_token_mlp(data, torch.arange(n), cfg["hidden"], cfg["wd"], cfg["epochs"], pool, seed=seed)
            with torch.no_grad():
                margins.append(test.margins(net, torch.arange(test.n), pool).double())
            runs.append(pair_metrics(margins[-1], held["gold_c"], held["gold_r"], held["prompts"]))
        ensemble = pair_metrics(sum(margins) / seeds, held["gold_c"], held["gold_r"], held["prompts"])
        acc, gold = [r["acc"] for r in runs], [r["gold_acc"] for r in runs]
        t, h = data.pooled(pool), test.pooled(pool)
        w, info = fit_bt_probe((t[:n, 0] - t[:n, 1]).double(), l2_grid=L2_GRID, rule="best")
        linear = pair_metrics((h[:, 0] - h[:, 1]).double() @ w, held["gold_c"], held["gold_r"], held["prompts"])
        out.append({"pairs": n, "acc": sum(acc) / seeds, "acc_range": [min(acc), max(acc)],
                    "gold_acc": sum(gold) / seeds, "seed0": runs[0], "ensemble": ensemble, "linear": linear,
                    "linear_l2": info["l2"]})
        print(f"{n:6d} pairs: token head {out[-1]['acc']:.3f} ({min(acc):.3f}-{max(acc):.3f}), "
              f"gold {out[-1]['gold_acc']:.3f}; seed 0 {fmt(runs[0])}; {seeds} seeds averaged {fmt(ensemble)}; "
              f"linear probe {fmt(linear)}", flush=True)
    return out


def _load(paths: list[str]) -> dict:
    """Feature caches concatenated in order."""
    parts = [torch.load(p) for p in paths]
    layers = [k for k in parts[0]["tok"] if all(k in p["tok"] for p in parts)]  # the layers every cache has
    return {"tok": {k: [x for p in parts for x in p["tok"][k]] for k in layers},
            "gold_c": torch.cat([p["gold_c"] for p in parts]), "gold_r": torch.cat([p["gold_r"] for p in parts]),
            "prompts": [x for p in parts for x in p["prompts"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features", help="cache every response token's features")
    f.add_argument("--model", required=True)
    f.add_argument("--data", nargs="+", required=True, help="preference files, read in order as one set")
    f.add_argument("--out", required=True)
    f.add_argument("--layers", default="+".join(map(str, LAYERS)), help="e.g. 0+8")
    f.add_argument("--threads", type=int, default=0)
    for name in ("heads", "sizes"):
        h = sub.add_parser(name)
        h.add_argument("--train", nargs="+", required=True, help="training caches, concatenated in order")
        h.add_argument("--eval", required=True)
        h.add_argument("--layers", default="+".join(map(str, LAYERS)), help="cached layers side by side, e.g. 0+8")
        h.add_argument("--seeds", type=int, default=5)
        h.add_argument("--json", help="write the rows here")
        h.add_argument("--threads", type=int, default=0)
    s = sub.choices["sizes"]
    s.add_argument("--sizes", required=True, help="numbers of training pairs, e.g. 576,1152,2304")
    s.add_argument("--pool", choices=("mean", "sum"), default="sum")
    s.add_argument("--config", default='{"hidden": 16, "wd": 0.3, "epochs": 4}', help="the MLP's settings (JSON)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = tuple(int(x) for x in args.layers.split("+"))
    if args.cmd == "features":
        extract(args.model, args.data, args.out, layers)
        return
    train, held = _load(args.train), _load([args.eval])
    if args.cmd == "heads":
        rows = head_table(train, held, layers, args.seeds)
    else:
        rows = size_table(train, held, layers, [int(n) for n in args.sizes.split(",")], json.loads(args.config),
                          args.pool, args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
