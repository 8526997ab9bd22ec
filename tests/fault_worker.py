"""A process with rlhfkit imported that forks one CLI run per request, so that a test can SIGKILL
dozens of runs without paying the interpreter's start-up each time (tests/test_faults.py).

Protocol, one JSON object per line: the test writes ``{"argv": [...], "env": {...}, "log": PATH}``;
the worker answers ``{"pid": PID}`` at once and ``{"status": STATUS}`` (os.waitpid's) when the run
ends, killed or not. Nothing here runs a tensor operation before forking: OpenMP's thread pool is
not fork-safe once used, so each child starts its own.
"""

from __future__ import annotations

import json
import os
import sys

# the protocol gets its own copy of stdout; whatever a library prints goes to stderr
PROTOCOL = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

# the imports a run needs, paid once (transformers and accelerate import lazily otherwise)
import accelerate.utils  # noqa: F401
import safetensors.torch  # noqa: F401
import torch.utils.tensorboard  # noqa: F401
import tqdm.auto  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import rlhfkit.trainers.sft  # noqa: F401
from rlhfkit.cli import main

try:  # accelerate imports DeepSpeed, when it is installed, on every Accelerator()
    import deepspeed  # noqa: F401
except ImportError:
    pass


def serve() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the run: its output goes to its own log, not into this protocol
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(req.get("env", {}))
            code = 1
            try:
                code = main(req["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), file=PROTOCOL, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), file=PROTOCOL, flush=True)


if __name__ == "__main__":
    serve()
