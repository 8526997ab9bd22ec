"""Peak memory of loading a model and sharding it with FSDP2, with and without rank-0 loading.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_load_peak.py every
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_load_peak.py rank0

``every``: each rank reads the whole model, then shards it. ``rank0``: the trainers' way
(`FullySharded.loading`): rank 0 reads it, the other ranks build it on the meta device and get
their shards from rank 0 in `FullySharded.prepare`. Each rank prints its peak resident memory
(VmHWM) after sharding. ``--tiny`` runs it on a tiny random model (checks the script, nothing more).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import tiny_model_dir  # noqa: E402

from rlhfkit.models import DEFAULT_MODEL, load_causal_lm  # noqa: E402
from rlhfkit.models.loading import structure_only  # noqa: E402
from rlhfkit.parallel import FullySharded  # noqa: E402


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["every", "rank0"])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model: checks that the script runs")
    args = ap.parse_args()
    strategy = FullySharded()  # the strategy `train.fsdp: true` gives on N processes
    strategy.start(0)
    if args.tiny:
        if strategy.is_main:
            tiny_model_dir()
        strategy.wait()
        args.model = tiny_model_dir()
    before = _kib("VmHWM")
    with strategy.loading() if args.mode == "rank0" else structure_only(False):
        model = load_causal_lm(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    strategy.prepare(model, optimizer)
    print(f"rank {strategy.rank} ({args.mode}): peak RSS {_kib('VmHWM') / 1e6:.2f} GB after load + shard "
          f"({before / 1e6:.2f} GB before loading); now {_kib('VmRSS') / 1e6:.2f} GB; "
          f"weights read by ranks {strategy.layout['weights_read_by_ranks']}", flush=True)


if __name__ == "__main__":
    main()
