"""Peak memory of loading a model and sharding it with FSDP2, with and without rank-0 loading.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_load_peak.py every
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_load_peak.py rank0

``every``: each rank reads the whole model, then shards it. ``rank0``: the trainers' way
(`Runtime.loading_shards`): rank 0 reads it, the other ranks build it on the meta device and get
their shards from rank 0. Each rank prints its peak resident memory (VmHWM) after sharding.
"""

from __future__ import annotations

import argparse

import torch

from rlhfkit.models import load_causal_lm
from rlhfkit.models.loading import structure_only
from rlhfkit.trainers.common import Runtime


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["every", "rank0"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    rt = Runtime(0, fsdp=True)
    before = _kib("VmHWM")
    with rt.loading_shards() if args.mode == "rank0" else structure_only(False):
        model = load_causal_lm(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rt.prepare(model, optimizer)
    print(f"rank {rt.rank} ({args.mode}): peak RSS {_kib('VmHWM') / 1e6:.2f} GB after load + shard "
          f"({before / 1e6:.2f} GB before loading); now {_kib('VmRSS') / 1e6:.2f} GB; "
          f"weights read by ranks {rt.layout['weights_read_by_ranks']}", flush=True)


if __name__ == "__main__":
    main()
