"""A fake data-parallel `reduce` (sum over ranks) for pure-function tests: each "rank" runs in a
thread and every call blocks until all ranks have contributed, like an all-reduce."""

import threading

import torch


class FakeAllReduce:
    def __init__(self, world_size: int):
        self.slots = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=30)

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:  # same order on every rank: identical results
                total += other
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return total
        return reduce


def run_ranks(fn, shards: list) -> list:
    """fn(shard, reduce) on every shard concurrently, one thread per rank; results in rank order."""
    fake, results, errors = FakeAllReduce(len(shards)), [None] * len(shards), []

    def work(rank):
        try:
            results[rank] = fn(shards[rank], fake.for_rank(rank))
        except BaseException as e:  # surfaced below; a broken barrier releases the others
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
