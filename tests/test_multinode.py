"""Multi-node rendezvous: two torchrun "nodes" on this machine against one process.

Each node is its own `torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --rdzv-backend c10d
--rdzv-endpoint localhost:PORT` launcher with one gloo process; the two agents meet through the
c10d rendezvous (one hosts the store, the other connects to it), as on two hosts. Each runs a tiny
SFT and a tiny PPO (tests/dist_worker.py), and the results must be the 1-process results with the
same global batch: SFT's losses and weights directly; PPO's on the experience the two ranks sampled
(replayed through 1 process, as in tests/test_distributed.py). Not covered: separate hosts (real
network interfaces, clocks, and filesystems that are shared but not local).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from test_distributed import (
    _assert_same_metrics,
    _assert_same_pg_run,
    _assert_same_weights,
    _pg_args,
    _replay,
    _sft_args,
    one_thread,  # noqa: F401  (autouse: the 1-process runs use one thread, like each node's process)
    pytestmark,  # noqa: F401  (needs gloo)
)

from rlhfkit.cli import main as cli

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_nodes(jobs: Path, port: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
         "--rdzv-id", "rlhfkit-multinode-test", str(HERE / "dist_worker.py"), str(jobs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for rank in (0, 1)]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, tiny_model_dir, tokenizer):
    """SFT and PPO run by two single-process torchrun nodes; returns the work directory."""
    from pg_utils import tiny_policy_dir, write_prompts, write_reward

    work = tmp_path_factory.mktemp("multinode")
    write_jsonl(work / "sft.jsonl", [
        {"prompt": f"Count to {i}", "response": " ".join(str(j) for j in range(1, i % 7 + 2))} for i in range(48)])
    tiny_policy_dir(tokenizer, work / "policy")
    write_prompts(work / "prompts.jsonl")
    write_reward(work / "reward_fn.py")
    jobs = [{"argv": _sft_args(tiny_model_dir, work / "sft.jsonl", work / "sft-2n")},
            {"argv": _pg_args("ppo", work, work / "ppo-2n"), "capture": str(work / "ppo-2n-rollouts")}]
    (work / "jobs.json").write_text(json.dumps([{**j, "argv": [str(a) for a in j["argv"]]} for j in jobs]))
    procs = _launch_nodes(work / "jobs.json", _free_port())
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {rank}:\n{out[-5000:]}"
    return work


def test_two_nodes_sft_equals_one_process(nodes, tiny_model_dir):
    layout = json.loads((nodes / "sft-2n" / "sft_results.json").read_text())["distributed"]
    assert layout["world_size"] == 2, layout
    one = nodes / "sft-1"
    assert cli(_sft_args(tiny_model_dir, nodes / "sft.jsonl", one)) == 0
    _assert_same_metrics(one, nodes / "sft-2n", ["train/loss", "train/grad_norm", "eval/loss"])
    _assert_same_weights(one, nodes / "sft-2n")


def test_two_nodes_ppo_equals_one_process_on_the_same_experience(nodes, monkeypatch):
    from rlhfkit.trainers import ppo

    two = nodes / "ppo-2n"
    assert json.loads((two / "ppo_results.json").read_text())["distributed"]["world_size"] == 2
    _replay(monkeypatch, ppo, nodes / "ppo-2n-rollouts")
    one = nodes / "ppo-1"
    assert cli(_pg_args("ppo", nodes, one)) == 0
    _assert_same_pg_run("ppo", one, two)
    assert torch.load(nodes / "ppo-2n-rollouts" / "rollout-1-rank1.pt", weights_only=False)["items"]
