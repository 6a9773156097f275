"""Benchmark mask calibration on Llama-3-8B-shaped random B (32 layers, all seven projections).

Reports, for r = 32 and r = 64, calibration time as a ratio to one ``torch.topk`` over the same
entries flattened (the peer, measured in the same run; target <= 1.5x), and the peak extra memory
of calibration as a ratio to the bytes of B (target <= 2x). Prints one JSON line.

    python experiments/bench_calibration.py [--ranks 32 64] [--repeats 3] [--device cuda] [--threads 2]

B, the peer's input and all of calibration's work live on ``--device``. On a CPU shared with other
busy processes, multi-threaded ops wait for their slowest thread while the peer (``torch.topk`` on
one 1-D tensor) runs on one: compare ``--threads 1`` to tell contention from a slow calibration.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from lori.core.masks import calibrate, keep_count

OUTS = {"q_proj": 4096, "k_proj": 1024, "v_proj": 1024, "o_proj": 4096,
        "gate_proj": 14336, "up_proj": 14336, "down_proj": 4096}


def llama3_8b_bs(r: int, layers: int = 32, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(r)
    return {
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}":
            torch.randn(o, r, generator=g).to(device)
        for i in range(layers) for p, o in OUTS.items()
    }


def peak_extra_bytes(fn, device: str) -> int:
    """Peak bytes allocated by ``fn`` above the memory in use before it (CUDA allocator, or the
    torch profiler on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for e in events:  # self memory of each op, in time order: allocations positive, frees negative
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def timed(fn, repeats: int, device: str) -> float:
    cuda = torch.device(device).type == "cuda"
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(r: int, repeats: int, sparsity: float, device: str = "cpu", layers: int = 32) -> dict:
    bs = llama3_8b_bs(r, layers, device)
    n = sum(t.numel() for t in bs.values())
    b_bytes = sum(t.numel() * t.element_size() for t in bs.values())
    k = keep_count(n, sparsity)
    t_cal = timed(lambda: calibrate(bs, sparsity, "model"), repeats, device)
    flat = torch.cat([t.reshape(-1) for t in bs.values()]).abs()
    t_topk = timed(lambda: torch.topk(flat, k, sorted=False), repeats, device)
    flat = None  # drop the copy before the peak is measured
    gc.collect()
    peak = peak_extra_bytes(lambda: calibrate(bs, sparsity, "model"), device)
    return {
        "r": r, "entries": n, "b_bytes": b_bytes, "calibrate_s": round(t_cal, 3), "topk_s": round(t_topk, 3),
        "time_ratio_vs_topk": round(t_cal / t_topk, 3), "peak_extra_bytes": peak,
        "peak_extra_ratio_vs_B": round(peak / b_bytes, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--device", default="cpu", help="where B lives and calibration runs (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of B (32 = Llama-3-8B; fewer: a smoke run)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = [bench(r, args.repeats, args.sparsity, args.device, args.layers) for r in args.ranks]
    print(json.dumps({
        "benchmark": "calibration", "device": args.device, "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()], "sparsity": args.sparsity,
        "granularity": "model", "layers": args.layers, "results": results,
        "targets": {"time_ratio_vs_topk": 1.5, "peak_extra_ratio_vs_B": 2.0},
    }))


if __name__ == "__main__":
    main()
