"""Ray object store, worker to worker: the path the reference's logits take to a candidate.

    python bench/object_store.py [--T 2048] [--V 152064]

One actor returns a T×V float32 block (the reference's scores), a second receives it as an
ObjectRef argument and reduces it (the candidate), the driver only gets a float.
On one node the store is shared memory: the return is one copy in, the read maps it. Then the
same block as a torch tensor over Ray Direct Transport with gloo (placement.logits_transport:
gloo): the producer keeps it, gloo sends it to the consumer over the node's loopback. Reported:
bytes per token (V × 4), seconds and GB/s. docs/benchmarks.md's on-paper estimate for a 7B model at
V = 152k uses these rates.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray


@ray.remote(enable_tensor_transport=True)
class Producer:
    def make(self, t: int, v: int) -> None:
        self.block = np.random.default_rng(0).standard_normal((t, v), dtype=np.float32)

    def give(self):
        return self.block  # serialised into the shared-memory store: one copy

    def give_tensor(self):
        import torch

        return torch.from_numpy(self.block)  # stays here; RDT sends it to whoever receives the ref


@ray.remote(enable_tensor_transport=True)
class Consumer:
    def touch(self, block) -> float:
        return float(block[:, ::4096].sum())  # reads every row: the block is mapped (store) or received (gloo)


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
    from ray.experimental.collective import create_collective_group

    create_collective_group([producer, consumer], backend="torch_gloo")
    sent = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        ray.get(consumer.touch.remote(producer.give_tensor.options(tensor_transport="gloo").remote()))
        sent = min(sent, time.perf_counter() - t)
    print(f"Ray Direct Transport, gloo (a tensor, producer to consumer, received and reduced): {sent:.3f}s = {nbytes / sent / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
