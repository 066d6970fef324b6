"""cuBLASLt GEMM throughput through palmcore's matmul op: TFLOP/s for float32 (COMPUTE_32F, no
TF32) and bf16 inputs (float32 accumulation) at 4096^3 and at a PaLM-8B MLP shape
(8192 tokens x 4096 -> 16384). Prints one short table.

    python bench/gpu/gemm.py [--device cuda:0] [--repeats 10] [--quick]

--quick times one small shape (256^3) once: a check that the script runs (the emulated device).
"""

from __future__ import annotations

import argparse

from palmcore import _core

SHAPES = [("4096^3", 4096, 4096, 4096), ("PaLM-8B w_gate (8192x4096 @ 4096x16384)", 8192, 16384, 4096)]
QUICK_SHAPES = [("256^3", 256, 256, 256)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one small shape, once")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    print(f"{'shape':<42} {'inputs':<9} {'ms':>8} {'TFLOP/s':>8}")
    for name, m, n, k in QUICK_SHAPES if args.quick else SHAPES:
        for dtype in ("float32", "bfloat16"):
            seconds = _core.kernels.time_matmul(m, n, k, dtype, args.device, repeats)
            print(f"{name:<42} {dtype:<9} {seconds * 1e3:>8.3f} {2 * m * n * k / seconds / 1e12:>8.1f}")


if __name__ == "__main__":
    main()
