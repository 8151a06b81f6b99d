"""Ahead-of-time compilation of every Triton kernel here for a CUDA target, without a GPU.

`compile_all(arch=90)` runs `triton.compile` on each kernel for each input dtype (fp16, bf16, fp32,
fp64) and output dtype (fp32, fp64) with the same compute configuration the launchers pick on a GPU,
once for every config of the kernel's GPU autotune list of that dtype family (gram, ghost_gram and
psg_gram's features kernel: see _autotune), so a config that cannot lower fails here; it returns
[(kernel name, dtype combo + config, len(cubin)), ...]; any failure raises. It needs the real
(non-interpreted) JIT functions: call it in a process where TRITON_INTERPRET is unset.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._autotune import family
from .ghost_gram import _TUNE as _GHOST
from .gram import _TUNE as _GRAM
from .gram import _compute_config, _is_interpreted, gram_kernel
from .psg_gram import _TUNE as _PSG

__all__ = ["compile_all", "variants", "config_label", "TUNED"]

_IN = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}
_OUT = {"fp32": tl.float32, "fp64": tl.float64}
# every autotuned kernel: each config of each of its GPU lists is compiled
TUNED = (_GRAM, _GHOST, _PSG)


def config_label(cfg) -> str:
    """A config as it appears in variant labels: its block sizes, then warps and stages."""
    blocks = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{blocks} w{cfg.num_warps}s{cfg.num_stages}"


def _per_config(tuned, fam, label, sig, const):
    """One variant per GPU config of `tuned`'s family `fam` (blocks as constexprs)."""
    for cfg in tuned.gpu_configs[fam]:
        full = dict(const, **cfg.kwargs)
        yield (tuned.kernel, f"{label} {config_label(cfg)}", _constexpr_sig(sig, full), full,
               dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _constexpr_sig(sig, const):
    sig = dict(sig)
    for k in const:
        sig.setdefault(k, "constexpr")
    return sig


def variants():
    """Yield (kernel fn, label, signature, constexprs, options) for every compiled variant."""
    for in_name, in_tl in _IN.items():
        for out_name, out_tl in _OUT.items():
            cdt, acc, prec = _compute_config([in_tl], out_tl, interpret=False)
            pin, pout = "*" + in_name, "*" + out_name
            common = dict(CDT=cdt, ACC=acc, PREC=prec)
            fam = family(cdt, acc)
            combo = f"{in_name}->{out_name}"
            for sym in (False, True):
                sig = dict(a_ptr=pin, b_ptr=pin, out_ptr=pout, N="i32", M="i32", P="i32",
                           K_SPLIT="i32", split_stride="i64", SIZE_KEY="i32")
                const = dict(SYM=sym, GROUP_M=8, **common)
                yield from _per_config(_GRAM, fam, f"{combo} sym={int(sym)}", sig, const)
            pair_sig = dict(x1_ptr=pin, g1_ptr=pin, m1_ptr="*u8", x2_ptr=pin, g2_ptr=pin,
                            m2_ptr="*u8", out_ptr=pout, N="i32", M="i32", T="i32", S="i32",
                            D_IN="i32", D_OUT="i32", row_base="i32", SIZE_KEY="i32")
            for sym in (False, True):
                const = dict(SYM=sym, HAS_M1=True, HAS_M2=True, **common)
                yield from _per_config(_GHOST, fam, f"{combo} sym={int(sym)} masked", pair_sig, const)
            for sign in (False, True):
                sig = dict(x_ptr=pin, g_ptr=pin, m_ptr="*u8", f_ptr=pout, T="i32", D_IN="i32",
                           D_OUT="i32", o0="i32", OC="i32", SIZE_KEY="i32")
                const = dict(HAS_M=True, SIGN=sign, ROUND_BF16=False, **common)
                yield from _per_config(_PSG, fam, f"{combo} sign={int(sign)} masked", sig, const)
    # unmasked variants (mask pointers are None -> constexpr), once, with each kernel's first 16-bit config
    cdt, acc, prec = _compute_config([tl.bfloat16], tl.float32, interpret=False)
    first = lambda tuned: tuned.gpu_configs[family(cdt, acc)][0]  # noqa: E731
    sig = dict(x1_ptr="*bf16", g1_ptr="*bf16", x2_ptr="*bf16", g2_ptr="*bf16", out_ptr="*fp32", N="i32",
               M="i32", T="i32", S="i32", D_IN="i32", D_OUT="i32", row_base="i32", SIZE_KEY="i32")
    const = dict(m1_ptr=None, m2_ptr=None, SYM=True, HAS_M1=False, HAS_M2=False,
                 CDT=cdt, ACC=acc, PREC=prec, **first(_GHOST).kwargs)
    yield (_GHOST.kernel, "bf16->fp32 sym=1 unmasked", _constexpr_sig(sig, const), const,
           dict(num_warps=first(_GHOST).num_warps, num_stages=first(_GHOST).num_stages))
    for fin in ("fp32", "fp64"):  # signgd: signs of F built in the factors' dtype, stored in bf16
        cdt_s, acc_s, prec_s = _compute_config([_IN[fin]], _OUT[fin], interpret=False)
        sig = dict(x_ptr="*" + fin, g_ptr="*" + fin, m_ptr="*u8", f_ptr="*bf16", T="i32", D_IN="i32",
                   D_OUT="i32", o0="i32", OC="i32", SIZE_KEY="i32")
        cfg = _PSG.gpu_configs[family(cdt_s, acc_s)][0]
        const = dict(HAS_M=True, SIGN=True, ROUND_BF16=False, CDT=cdt_s, ACC=acc_s, PREC=prec_s, **cfg.kwargs)
        yield (_PSG.kernel, f"{fin}->bf16 sign tiles masked", _constexpr_sig(sig, const), const,
               dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    for tiles in ("fp32", "bf16"):  # bf16: 16-bit tiles (tile_dtype=torch.bfloat16)
        sig = dict(x_ptr="*bf16", g_ptr="*bf16", f_ptr="*" + tiles, T="i32", D_IN="i32",
                   D_OUT="i32", o0="i32", OC="i32", SIZE_KEY="i32")
        const = dict(m_ptr=None, HAS_M=False, SIGN=True, ROUND_BF16=False, CDT=cdt, ACC=acc, PREC=prec,
                     **first(_PSG).kwargs)
        yield (_PSG.kernel, f"bf16->{tiles} tiles sign=1 unmasked", _constexpr_sig(sig, const), const,
               dict(num_warps=first(_PSG).num_warps, num_stages=first(_PSG).num_stages))


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
