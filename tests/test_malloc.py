"""The CPU allocator settings: training steps reuse the pages of freed large buffers instead of
faulting fresh ones in every step (counted with the process's minor page faults, not timed)."""

import os
import platform
import statistics
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, torch
    from rlhfkit.models import load_tokenizer, tiny_causal_lm
    from rlhfkit.parallel.malloc import keep_freed_memory
    torch.set_num_threads(1)
    applied = keep_freed_memory()
    assert keep_freed_memory() == applied  # once per process, same answer
    tok = load_tokenizer("smollm2-135m-instruct")
    # hidden 256: the tied embedding's dense gradient is 49152 x 256 fp32 = 50 MB, above glibc's
    # largest mmap threshold (32 MB), as the default model's 113 MB one is
    model = tiny_causal_lm(tok, hidden_size=256, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1000, (2, 32))
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(int(applied), *faults)
""")
GRAD_PAGES = 49152 * 256 * 4 // 4096  # pages of one embedding gradient


def _probe(setting: str) -> tuple[int, list[int]]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, "RLHFKIT_MALLOC": setting},
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), [int(x) for x in out[1:]]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_training_steps_reuse_freed_pages():
    applied, faults = _probe("")
    assert applied == 1
    # after warm-up the steps run on pages already touched. The heap still grows now and then (a
    # step faulting in up to one gradient's worth; over the first steps more often when another
    # process loads the machine), so the typical step after eight is what is checked
    assert statistics.median(faults[8:]) < GRAD_PAGES // 10, faults

    applied, faults = _probe("default")  # opt-out: glibc maps and unmaps the big buffers every step
    assert applied == 0
    assert min(faults[2:]) > GRAD_PAGES, faults  # every step faults in more than one whole gradient


def test_every_strategy_applies_it_on_cpu():
    from rlhfkit.parallel import SingleProcess, malloc

    SingleProcess()
    assert malloc._applied is not None  # decided (applied, or not available on this C library)
    assert malloc.keep_freed_memory() == malloc._applied
