"""This machine's matmul ceiling: best sustained torch.matmul rate on square matrices, fp32 and bf16."""

from __future__ import annotations

import time

import torch

from bench.workers._io import main


def matmul_rate(size: int, dtype: torch.dtype, seconds: float, windows: int) -> float:
    """Best FLOP/s of back-to-back (size x size) @ (size x size) products over `windows` windows of about `seconds`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(2):  # warm-up: thread pool, kernel selection
        torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b, out=out)
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and count >= 3:
                break
        best = max(best, 2.0 * size**3 * count / elapsed)
    return best


def run(spec: dict) -> dict:
    rates: dict[str, dict[str, float]] = {}
    peaks: dict[str, float] = {}
    for name in spec["dtypes"]:
        dtype = getattr(torch, name)
        rates[name] = {str(size): matmul_rate(size, dtype, spec["seconds"], spec["windows"]) for size in spec["sizes"]}
        peaks[name] = max(rates[name].values())
        print(
            f"[ceiling] {name}: " + ", ".join(f"{s}: {r / 1e9:.1f} GFLOP/s" for s, r in rates[name].items()), flush=True
        )
    return {"rates": rates, "peak_flops": peaks, "threads": torch.get_num_threads(), "torch": torch.__version__}


if __name__ == "__main__":
    main(run)
