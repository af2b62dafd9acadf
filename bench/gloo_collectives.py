"""torch.distributed gloo baseline for `phalanx bench collectives`.

    .venv/bin/torchrun --nproc-per-node 4 bench/gloo_collectives.py [--size-mib 64] [--iters 20]
    phalanx bench collectives --gloo [--hosts 2] runs it beside phalanx's, on the same hosts.

Times dist.all_reduce and dist.broadcast of one float32 tensor (64 MiB by default) between a
barrier and the op's return, takes the slowest rank per iteration (as phalanx's bench does), and
prints time and algbw/busbw with the nccl-tests definitions (allreduce busbw = algbw x 2(n-1)/n,
broadcast busbw = algbw), median with min/max over the iterations.
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", type=float, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ops", default="allreduce,broadcast")
    a = p.parse_args()
    dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    nbytes = int(a.size_mib * (1 << 20))
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    for op in a.ops.split(","):
        times = []
        for it in range(a.warmup + a.iters):
            t.fill_(rank + 1)
            dist.barrier()
            t0 = time.perf_counter()
            if op == "allreduce":
                dist.all_reduce(t)
            else:
                dist.broadcast(t, src=0)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if it >= a.warmup:
                times.append(dt.item())
        want = n * (n + 1) / 2 if op == "allreduce" else 1.0
        assert torch.all(t == want), f"{op}: wrong result"
        factor = 2 * (n - 1) / n if op == "allreduce" else 1.0
        med, lo, hi = statistics.median(times), min(times), max(times)
        alg = lambda s: nbytes / s / 1e9
        if rank == 0:
            print(
                f"gloo {op:9s} world {n} size {a.size_mib:g}MiB iters {a.iters}: "
                f"time_med {med * 1e6:.1f} us (min {lo * 1e6:.1f}, max {hi * 1e6:.1f}) "
                f"algbw {alg(med):.3f} GB/s busbw {alg(med) * factor:.3f} GB/s "
                f"(min {alg(hi) * factor:.3f}, max {alg(lo) * factor:.3f})",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
