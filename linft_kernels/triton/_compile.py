"""Ahead-of-time compilation of every Triton kernel here for a CUDA target, without a GPU.

`compile_all(arch=90)` runs `triton.compile` on each kernel for each input dtype (fp16, bf16, fp32,
fp64) and output dtype (fp32, fp64) with the same compute configuration the launchers pick on a GPU,
and returns [(kernel name, dtype combo, len(cubin)), ...]; any failure raises. It needs the real
(non-interpreted) JIT functions: call it in a process where TRITON_INTERPRET is unset.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gram import _GPU_CONFIGS, FP64_PAIR_BLOCK, _compute_config, _is_interpreted, gram_kernel
from .ghost_gram import ghost_gram_kernel
from .psg_gram import _feature_blocks, psg_features_kernel

__all__ = ["compile_all", "variants"]

_IN = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}
_OUT = {"fp32": tl.float32, "fp64": tl.float64}

# launcher defaults (keep in sync with ghost_gram.py; gram uses its autotune list, psg_gram
# its _feature_blocks)
_GHOST_BLOCKS = dict(BLOCK_T=32, BLOCK_S=32, BLOCK_D=32)


def variants():
    """Yield (kernel fn, label, signature, constexprs, options) for every compiled variant."""
    for in_name, in_tl in _IN.items():
        for out_name, out_tl in _OUT.items():
            cdt, acc, prec = _compute_config([in_tl], out_tl, interpret=False)
            pin, pout = "*" + in_name, "*" + out_name
            common = dict(CDT=cdt, ACC=acc, PREC=prec)
            family = "fp64" if acc == tl.float64 else ("16bit" if cdt in (tl.float16, tl.bfloat16) else "fp32")
            for sym in (False, True):
                sig = dict(a_ptr=pin, b_ptr=pin, out_ptr=pout, N="i32", M="i32", P="i32",
                           K_SPLIT="i32", split_stride="i64", SIZE_KEY="i32", SYM="constexpr",
                           CDT="constexpr", ACC="constexpr", PREC="constexpr", BLOCK_M="constexpr",
                           BLOCK_N="constexpr", BLOCK_K="constexpr", GROUP_M="constexpr")
                # every block shape the GPU autotuner may pick for this dtype family
                for cfg in _GPU_CONFIGS[family]:
                    kw = cfg.kwargs
                    yield (gram_kernel,
                           f"{in_name}->{out_name} sym={int(sym)} {kw['BLOCK_M']}x{kw['BLOCK_K']}"
                           f" w{cfg.num_warps}s{cfg.num_stages}", sig,
                           dict(SYM=sym, **common, **kw),
                           dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            pair_sig = dict(x1_ptr=pin, g1_ptr=pin, m1_ptr="*u8", x2_ptr=pin, g2_ptr=pin,
                            m2_ptr="*u8", out_ptr=pout, N="i32", M="i32", T="i32", S="i32",
                            D_IN="i32", D_OUT="i32", row_base="i32")
            for sym in (False, True):
                sig = dict(pair_sig, SYM="constexpr", HAS_M1="constexpr", HAS_M2="constexpr",
                           CDT="constexpr", ACC="constexpr", PREC="constexpr",
                           BLOCK_T="constexpr", BLOCK_S="constexpr", BLOCK_D="constexpr")
                gblocks = _GHOST_BLOCKS if out_name != "fp64" else dict.fromkeys(_GHOST_BLOCKS, FP64_PAIR_BLOCK)
                yield (ghost_gram_kernel, f"{in_name}->{out_name} sym={int(sym)} masked", sig,
                       dict(SYM=sym, HAS_M1=True, HAS_M2=True, **common, **gblocks),
                       dict(num_warps=4, num_stages=2))
            for sign in (False, True):
                sig = dict(x_ptr=pin, g_ptr=pin, m_ptr="*u8", f_ptr=pout, T="i32", D_IN="i32",
                           D_OUT="i32", o0="i32", OC="i32", HAS_M="constexpr", SIGN="constexpr",
                           CDT="constexpr", ACC="constexpr", PREC="constexpr", BLOCK_O="constexpr",
                           BLOCK_D="constexpr", BLOCK_T="constexpr")
                yield (psg_features_kernel, f"{in_name}->{out_name} sign={int(sign)} masked", sig,
                       dict(HAS_M=True, SIGN=sign, **common, **_feature_blocks(cdt, acc, False)),
                       dict(num_warps=4, num_stages=3))
    # unmasked variants (mask pointers are None -> constexpr), once
    cdt, acc, prec = _compute_config([tl.bfloat16], tl.float32, interpret=False)
    sig = dict(x1_ptr="*bf16", g1_ptr="*bf16", m1_ptr="constexpr", x2_ptr="*bf16",
               g2_ptr="*bf16", m2_ptr="constexpr", out_ptr="*fp32", N="i32", M="i32",
               T="i32", S="i32", D_IN="i32", D_OUT="i32", row_base="i32")
    const = dict(m1_ptr=None, m2_ptr=None, SYM=True, HAS_M1=False, HAS_M2=False,
                 CDT=cdt, ACC=acc, PREC=prec, **_GHOST_BLOCKS)
    for k in const:
        sig.setdefault(k, "constexpr")
    yield ghost_gram_kernel, "bf16->fp32 sym=1 unmasked", sig, const, dict(num_warps=4, num_stages=2)
    sig = dict(x_ptr="*bf16", g_ptr="*bf16", m_ptr="constexpr", f_ptr="*fp32", T="i32", D_IN="i32",
               D_OUT="i32", o0="i32", OC="i32")
    const = dict(m_ptr=None, HAS_M=False, SIGN=True, CDT=cdt, ACC=acc, PREC=prec,
                 **_feature_blocks(cdt, acc, False))
    for k in const:
        sig.setdefault(k, "constexpr")
    yield psg_features_kernel, "bf16->fp32 sign=1 unmasked", sig, const, dict(num_warps=4, num_stages=3)


def compile_all(arch: int = 90):
    """Compile every kernel variant for CUDA sm_<arch>; return [(name, combo, len(cubin))]."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _is_interpreted(gram_kernel):
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (kernels are interpreted here)")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for fn, label, sig, const, opts in variants():
        # keep the signature in the kernel's argument order
        sig = {name: sig[name] for name in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        try:
            compiled = triton.compile(src, target=target, options=opts)
        except Exception as e:  # re-raise with the variant that failed
            raise RuntimeError(f"triton.compile failed for {fn.__name__} [{label}] sm_{arch}: {e}") from e
        cubin = compiled.asm.get("cubin")
        if not cubin:
            raise RuntimeError(f"no cubin produced for {fn.__name__} [{label}] sm_{arch}")
        results.append((fn.__name__, label, len(cubin)))
    return results
