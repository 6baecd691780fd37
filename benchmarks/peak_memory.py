"""Peak memory of one forward + backward of a step-loss implementation, in a fresh process.

    python benchmarks/peak_memory.py --device cpu --size flux_720 --impl fused   -> prints bytes

A separate process because the CPU measurement changes how glibc serves allocations (see
workloads.peak_memory_bytes), which would slow every later timing in the same process.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import workloads  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", required=True, choices=sorted(workloads.SIZES))
    parser.add_argument("--impl", required=True, choices=sorted(workloads.IMPLEMENTATIONS))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    # Before any tensor exists: otherwise warm-up allocations would sit in glibc's heap and be
    # reused unseen by the resident-set measurement.
    workloads.serve_large_allocations_by_mmap()
    if args.threads:
        torch.set_num_threads(args.threads)
    case = workloads.make_case(args.size, args.device)
    run = lambda: workloads.forward_backward(args.impl, case)  # noqa: E731
    for _ in range(2):  # warm-up (compilation), then drop the gradient so it is counted
        run()
    case.model_output.grad = None
    print(workloads.peak_memory_bytes(run, args.device))


if __name__ == "__main__":
    main()
