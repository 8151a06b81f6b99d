"""Where psg_gram's time goes on a GPU: a diagnostic, not a benchmark row.

psg_gram's symmetric form at the ops sweep's shape (N=256, T=256, d_in=d_out=1024, bf16, F in bf16
tiles) is two stages: build every sample's gradient F_i = g_i^T x_i (2*N*T*d_in*d_out FLOP, F is
N*d_in*d_out entries), then its Gram (N^2*d_in*d_out multiply-adds in the symmetric half). This times
each stage alone, by the library's kernels and by cuBLAS, next to the whole op, so the stage that
keeps psg_gram from the GEMM rate can be named:
  * copy: a device-to-device copy of F's size (the bandwidth ceiling; bytes read + written),
  * gemm: torch's bf16 8192^3 matmul (the arithmetic ceiling),
  * build: torch.bmm(g^T, x) into bf16 F (cuBLAS, fp32 accumulation),
  * gram of the whole F (N x d_in*d_out) and of one chunk of the Triton op's scratch: Triton gram
    (symmetric, autotuned, split-K as chosen and forced), cuBLAS F @ F^T (bf16 out; fp32 out where
    torch.mm takes out_dtype),
  * the whole op: linft_kernels.psg_gram (triton backend, bf16 tiles: on a GPU cuBLAS's F and the
    Triton gram), the Triton two-stage kernel it replaced there, and the all-cuBLAS candidates.
Medians of triton.testing.do_bench (CUDA events), inputs drawn at random once.

    python bench/profile_psg_gpu.py --out $OUT/psg-profile.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--t", type=int, default=256)
    ap.add_argument("--d", type=int, default=1024, help="d_in = d_out")
    ap.add_argument("--out", default=None, help="also write the report (and a .json beside it) here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): "
                                                         "checks the script, times nothing worth reading")
    args = ap.parse_args()
    if args.quick:
        args.n, args.t, args.d = 8, 16, 32
    elif not torch.cuda.is_available():
        print("profile_psg_gpu.py needs a CUDA GPU (or --quick)", file=sys.stderr)
        return 2
    import time

    import triton

    import linft_kernels as lk
    from linft_kernels import _blas
    import importlib
    tgram = importlib.import_module("linft_kernels.triton.gram")  # the modules (the package exports functions)
    tpsg = importlib.import_module("linft_kernels.triton.psg_gram")

    N, T, d = args.n, args.t, args.d
    dev, bf16 = ("cpu" if args.quick else "cuda"), torch.bfloat16

    def timed_ms(fn):
        if dev == "cuda":
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[1]
    torch.manual_seed(0)
    x = torch.randn(N, T, d, device=dev, dtype=bf16)
    g = torch.randn(N, T, d, device=dev, dtype=bf16) / 16
    P = d * d
    flops_build, flops_gram = 2 * N * T * P, 2 * N * N * P  # the ops sweep's count: full Gram
    lines, rows = [], []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    def bench(name, fn, flops=None, nbytes=None):
        try:
            fn()
            ms = timed_ms(fn)
        except Exception as e:  # noqa: BLE001 - report and go on: a diagnostic
            say(f"{name:58s} ERROR {type(e).__name__}: {str(e)[:120]}")
            rows.append({"name": name, "error": str(e)[:400]})
            return None
        extra = ""
        if flops:
            extra += f"  {flops / ms / 1e9:8.1f} TFLOP/s"
        if nbytes:
            extra += f"  {nbytes / ms / 1e9:7.2f} TB/s"
        say(f"{name:58s} {ms:8.3f} ms{extra}")
        rows.append({"name": name, "ms": ms, "flops": flops, "bytes": nbytes})
        return ms

    say(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}  torch {torch.__version__}  triton {triton.__version__}  "
        f"N={N} T={T} d_in=d_out={d} bf16; F = {N * P * 2 / 2**20:.0f} MiB in bf16")
    src = torch.randn(N * P, device=dev, dtype=bf16)
    dst = torch.empty_like(src)
    bench("copy (F's size, bytes read+written)", lambda: dst.copy_(src), nbytes=2 * src.numel() * 2)
    del src, dst
    n_gemm = 8192 if dev == "cuda" else 256
    a = torch.randn(n_gemm, n_gemm, device=dev, dtype=bf16)
    bench(f"gemm bf16 {n_gemm}^3 (torch)", lambda: a @ a, flops=2 * n_gemm ** 3)
    del a

    F = torch.empty(N, d, d, device=dev, dtype=bf16)
    gt = g.transpose(1, 2)
    bench("build: torch.bmm(g^T, x) -> bf16 F", lambda: torch.bmm(gt, x, out=F), flops=flops_build,
          nbytes=(x.numel() + g.numel() + F.numel()) * 2)
    F2 = F.view(N, P)
    out = torch.zeros(N, N, device=dev)
    bench("gram of F: triton sym, auto split", lambda: tgram.gram(F2, None, out.zero_()), flops=flops_gram,
          nbytes=F2.numel() * 2)
    for s in (16, 32, 64, 128, 256):
        bench(f"gram of F: triton sym, split_k={s}", lambda s=s: tgram.gram(F2, None, out.zero_(), split_k=s),
              flops=flops_gram, nbytes=F2.numel() * 2)
    bench("gram of F: cuBLAS F @ F^T (bf16 out)", lambda: F2 @ F2.T, flops=flops_gram, nbytes=F2.numel() * 2)
    bench("gram of F: cuBLAS torch.mm(out_dtype=fp32)", lambda: torch.mm(F2, F2.T, out_dtype=torch.float32),
          flops=flops_gram, nbytes=F2.numel() * 2)
    bench("gram of F: _blas.cuda_gram_fp32", lambda: _blas.cuda_gram_fp32(F2, F2, out.zero_()),
          flops=flops_gram, nbytes=F2.numel() * 2)
    oc = max(1, min(d, tpsg.SCRATCH_BYTES // (N * d * 2)))
    Fc = F.view(N, d, d)[:, :oc].reshape(N, oc * d)
    bench(f"gram of one Triton-op chunk (P={oc * d}): triton sym", lambda: tgram.gram(Fc, None, out.zero_()),
          flops=2 * N * N * oc * d, nbytes=Fc.numel() * 2)
    del F, F2, Fc

    total = flops_build + flops_gram
    bench("psg_gram sgd: triton, bf16 tiles (the op as dispatched)",
          lambda: lk.psg_gram(x, g, None, None, kernel="sgd", backend="triton", tile_dtype=bf16), flops=total)
    bench("psg_gram sgd: Triton features kernel + Triton gram", lambda: tpsg.psg_gram(
        x, g, None, None, None, None, torch.zeros(N, N, device=dev), 0, tile_dtype=bf16), flops=total)
    bench("psg_gram sgd: cuBLAS chunks of 2^26 (candidate)", lambda: _blas.psg_gram(
        x, g, None, None, None, None, torch.zeros(N, N, device=dev), "sgd",
        gram=_blas.cuda_gram_fp32, buffer=1 << 26, rows_out=256), flops=total)
    bench("psg_gram sgd: cuBLAS, F whole (buffer N*d*d)", lambda: _blas.psg_gram(
        x, g, None, None, None, None, torch.zeros(N, N, device=dev), "sgd",
        gram=_blas.cuda_gram_fp32, buffer=N * P, rows_out=256), flops=total)
    bench("materialize: einsum + F @ F^T (bf16, the sweep's baseline)", lambda: (
        lambda f: f @ f.T)(torch.einsum("nto,ntd->nod", g, x).flatten(1)), flops=total)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        import machine  # bench/machine.py: hardware, versions, git commit and date, as harness rows carry
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
             "N": N, "T": T, "d": d, **machine.metadata(dev), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
