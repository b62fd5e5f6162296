"""Ray object store, worker to worker: the path the reference's logits take to a candidate.

    python bench/object_store.py [--T 2048] [--V 152064]

One actor returns a T×V float32 block (the reference's scores), a second receives it as an
ObjectRef argument and reduces it (the candidate), the driver only gets a float.
On one node the store is shared memory: the return is one copy in, the read maps it. Reported:
bytes per token (V × 4), seconds and GB/s for put + get. README's on-paper estimate for a
7B model at V = 152k uses this rate.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray


@ray.remote
class Producer:
    def make(self, t: int, v: int) -> None:
        self.block = np.random.default_rng(0).standard_normal((t, v), dtype=np.float32)

    def give(self):
        return self.block  # serialised into the shared-memory store: one copy


@ray.remote
class Consumer:
    def touch(self, block) -> float:
        return float(block[:, ::4096].sum())  # reads every row: the block is mapped, not copied


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--V", type=int, default=152064)
    args = ap.parse_args()
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, configure_logging=False)
    producer, consumer = Producer.remote(), Consumer.remote()
    ray.get(producer.make.remote(args.T, args.V))
    ray.get(consumer.touch.remote(np.zeros((8, 8), np.float32)))  # both actors up
    nbytes = args.T * args.V * 4
    put = read = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        block = producer.give.remote()
        ray.wait([block])  # in the store
        put = min(put, time.perf_counter() - t)
        t = time.perf_counter()
        ray.get(consumer.touch.remote(block))
        read = min(read, time.perf_counter() - t)
        del block
    print(f"T={args.T} V={args.V}: {nbytes / 1e9:.2f} GB ({args.V * 4 / 1e3:.0f} kB per token); best of 3")
    print(f"into the store (producer's return): {put:.3f}s = {nbytes / put / 1e9:.1f} GB/s")
    print(f"to the consumer (mapped, zero-copy) and reduced: {read:.3f}s")
    print(f"together: {nbytes / (put + read) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
