#!/usr/bin/python3
"""SGLang's per-step poll agreement, for `kvflow bench control --processes`: every rank
all_reduces its rooms' states with MIN over its attention-TP group, then over its CP group, on
gloo (CPU), one process per rank. Prints "gloo P50_US P99_US" (rank 0's step time, after a 10%
warm-up). Needs Debian's python3-torch (bench/setup.sh)."""
import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, tp, cp, rooms, rounds, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # rank = cp_rank * tp + tp_rank; every rank creates every group, in the same order.
    tp_groups = [dist.new_group([c * tp + t for t in range(tp)]) for c in range(cp)]
    cp_groups = [dist.new_group([c * tp + t for c in range(cp)]) for t in range(tp)]
    my_tp, my_cp = tp_groups[rank // tp], cp_groups[rank % tp]
    states = torch.zeros(rooms, dtype=torch.int32)
    times = []
    for r in range(rounds):
        states.fill_(1 + (r + rank) % 3)
        t0 = time.perf_counter()
        dist.all_reduce(states, op=dist.ReduceOp.MIN, group=my_tp)
        if cp > 1:
            dist.all_reduce(states, op=dist.ReduceOp.MIN, group=my_cp)
        times.append((time.perf_counter() - t0) * 1e6)
    if rank == 0:
        kept = sorted(times[len(times) // 10:])
        out.put((kept[len(kept) // 2], kept[min(len(kept) - 1, int(len(kept) * 0.99))]))
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--rooms", type=int, default=1)
    p.add_argument("--rounds", type=int, default=500)
    a = p.parse_args()
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    world = a.tp * a.cp
    procs = [ctx.Process(target=worker, args=(r, world, a.tp, a.cp, a.rooms, a.rounds, port, out)) for r in range(world)]
    for pr in procs:
        pr.start()
    p50, p99 = out.get(timeout=600)
    for pr in procs:
        pr.join()
    print(f"gloo {p50:.1f} {p99:.1f}", flush=True)


if __name__ == "__main__":
    main()
