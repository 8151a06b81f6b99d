"""`python -m linft_kernels`: versions, build information and which backend can run each op."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

import torch

from . import __version__, _dispatch, _native

OPS = ("gram", "ghost_gram", "psg_gram")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cuda_info(cuda) -> dict:
    info = {**cuda.build_info(), "visible_gpus": _native.cuda_device_count()}
    if info["visible_gpus"]:
        info["gram_tensor_cores"] = _native.gram_tensor_core_path()
    return info


def report() -> dict:
    cpu, cuda = _native.cpu_lib(), _native.cuda_lib()
    return {
        "linft_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "build": _native.build_info(),
        "native_cpu": cpu.build_info() if cpu else f"unavailable: {_native.load_error('_C_cpu')}",
        "native_cuda": _cuda_info(cuda) if cuda else f"unavailable: {_native.load_error('_C_cuda')}",
        "backends": _dispatch.table(),
    }


def _auto_choice(dev: str, op: str, in_dtype: torch.dtype) -> str:
    """The backend auto picks for `op` on `in_dtype` tensors of `dev` into an fp32 result (16-bit
    inputs shaped for tensor cores)."""
    tensor_cores = in_dtype in (torch.bfloat16, torch.float16)
    for name in _dispatch._auto_order(torch.device(dev), op, torch.float32, tensor_cores):
        if _dispatch.unavailable_reason(name, torch.device(dev)) is None:
            return name
    return "none"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = report()
    if "--json" in argv:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"linft_kernels {info['linft_kernels']}  python {info['python']}  torch {info['torch']}"
          f" (CUDA {info['torch_cuda']})  triton {info['triton']}")
    print(f"platform      {info['platform']}")
    for key in ("native_cpu", "native_cuda"):
        val = info[key]
        if isinstance(val, dict):
            val = ", ".join(f"{k}={v}" for k, v in val.items())
        print(f"{key:<13} {val}")
    b = info["build"]
    if b:
        print(f"built         {b.get('built_at')}  cxx flags {' '.join(b.get('cpu_flags', []))}")
        c = b.get("cuda", {})
        print("cuda build    " + (f"nvcc {c.get('nvcc_version')} archs {c.get('archs')}" if c.get("built")
                                  else f"not built: {c.get('reason')}"))
    rows = info["backends"]
    for dev in ("cpu", "cuda"):
        print(f"\nops on {dev} tensors: " + "  ".join(f"{b:<9}" for b in _dispatch.BACKENDS)
              + "  auto into fp32 (bf16 / fp32 inputs)")
        for op in OPS:
            cells = "  ".join(f"{'yes' if rows[b][dev] == 'yes' else 'no':<9}" for b in _dispatch.BACKENDS)
            auto = " / ".join(_auto_choice(dev, op, dt) for dt in (torch.bfloat16, torch.float32))
            print(f"  {op:<{len('ops on ' + dev + ' tensors:') - 2}}  {cells}  {auto}")
        for b in _dispatch.BACKENDS:
            if rows[b][dev] != "yes":
                print(f"  {b}: {rows[b][dev]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
