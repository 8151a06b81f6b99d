"""Ahead-of-time compilation of every Triton kernel here for a CUDA target, without a GPU.

`compile_all(arch=90)` runs `triton.compile` on each kernel for each input dtype (fp16, bf16, fp32,
fp64) and output dtype (fp32, fp64) with the same compute configuration the launchers pick on a GPU,
once for every config of the kernel's GPU autotune list of that dtype family (gram, ghost_gram and
psg_gram's features kernel: see _autotune), so a config that cannot lower fails here; it returns
[(kernel name, dtype combo + config, len(cubin), ptxas report, aligned), ...]; any failure raises.

Each variant is compiled with the alignment Triton's JIT finds in the usual launch (`aligned`):
every pointer 16-byte aligned and the feature widths (P, D_IN, D_OUT, K_SPLIT) multiples of 16,
which lets it vectorize loads and stores (the JIT marks any other integer argument that happens to
be a multiple of 16 too, e.g. N or T; those are left unmarked here); the first variant of each
kernel and dtype combo also without those hints (odd widths or offsets: the fallback must compile
too). The ptxas report is {"registers",
"stack", "spill_stores", "spill_loads"} from the `ptxas -v` log of Triton's own cubin step (None
where this Triton cannot hand out that log, or the kernel came from Triton's cache: give it an
empty TRITON_CACHE_DIR). It needs the real (non-interpreted) JIT functions: call it in a process
where TRITON_INTERPRET is unset.
"""
from __future__ import annotations

import contextlib
import io
import re

import triton
import triton.language as tl

from ._autotune import config_label, family
from .ghost_gram import _TUNE as _GHOST
from .gram import _TUNE as _GRAM
from .gram import _compute_config, _is_interpreted, gram_kernel
from .psg_gram import _TUNE as _PSG

__all__ = ["compile_all", "variants", "config_label", "TUNED"]

_IN = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}
_OUT = {"fp32": tl.float32, "fp64": tl.float64}
# every autotuned kernel: each config of each of its GPU lists is compiled
TUNED = (_GRAM, _GHOST, _PSG)


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
                            D_IN="i32", D_OUT="i32", row_base="i32", T_CHUNK="i32", SIZE_KEY="i32")
            for sym in (False, True):
                const = dict(SYM=sym, SPLIT=False, HAS_M1=True, HAS_M2=True, **common)
                yield from _per_config(_GHOST, fam, f"{combo} sym={int(sym)} masked", pair_sig, const)
            # the t split (slices into a scratch), with the family's first config
            cfg = _GHOST.gpu_configs[fam][0]
            for sym in (False, True):
                const = dict(SYM=sym, SPLIT=True, HAS_M1=True, HAS_M2=True, **common, **cfg.kwargs)
                yield (_GHOST.kernel, f"{combo} sym={int(sym)} split masked {config_label(cfg)}",
                       _constexpr_sig(pair_sig, const), const,
                       dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            for sign in (False, True):
                sig = dict(x_ptr=pin, g_ptr=pin, m_ptr="*u8", f_ptr=pout, T="i32", D_IN="i32",
                           D_OUT="i32", o0="i32", OC="i32", SIZE_KEY="i32")
                const = dict(HAS_M=True, SIGN=sign, ROUND_BF16=False, **common)
                yield from _per_config(_PSG, fam, f"{combo} sign={int(sign)} masked", sig, const)
    # unmasked variants (mask pointers are None -> constexpr), once, with each kernel's first 16-bit config
    cdt, acc, prec = _compute_config([tl.bfloat16], tl.float32, interpret=False)
    first = lambda tuned: tuned.gpu_configs[family(cdt, acc)][0]  # noqa: E731
    sig = dict(x1_ptr="*bf16", g1_ptr="*bf16", x2_ptr="*bf16", g2_ptr="*bf16", out_ptr="*fp32", N="i32",
               M="i32", T="i32", S="i32", D_IN="i32", D_OUT="i32", row_base="i32", T_CHUNK="i32",
               SIZE_KEY="i32")
    const = dict(m1_ptr=None, m2_ptr=None, SYM=True, SPLIT=False, HAS_M1=False, HAS_M2=False,
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


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(log: str):
    """{"registers", "stack", "spill_stores", "spill_loads"} of a one-kernel `ptxas -v` log, or None."""
    regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
    if not (regs and spill):
        return None
    stack, stores, loads = (int(v) for v in spill.groups())
    return {"registers": int(regs.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


@contextlib.contextmanager
def _ptxas_log():
    """Collects what Triton prints of its `ptxas -v` runs (knobs.nvidia.dump_ptxas_log, Triton >= 3.4)
    into the yielded StringIO; yields None where this Triton has no such knob."""
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        yield None
        return
    before, buf = nvidia.dump_ptxas_log, io.StringIO()
    nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        nvidia.dump_ptxas_log = before


# integer arguments that are multiples of 16 in the usual launch (feature widths, split lengths)
ALIGNED_INTS = ("P", "D_IN", "D_OUT", "K_SPLIT")


def _aligned_attrs(fn, sig):
    """Triton's specialization hints of the usual launch: pointers and ALIGNED_INTS divisible by 16."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if sig[name] != "constexpr" and (sig[name].startswith("*") or name in ALIGNED_INTS)}


def compile_all(arch: int = 90):
    """Compile every kernel variant for CUDA sm_<arch>; return
    [(name, combo, len(cubin), ptxas report, aligned)] (see the module docstring)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _is_interpreted(gram_kernel):
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (kernels are interpreted here)")
    target = GPUTarget("cuda", arch, 32)
    results, fallback_done = [], set()
    for fn, label, sig, const, opts in variants():
        # keep the signature in the kernel's argument order
        sig = {name: sig[name] for name in fn.arg_names}
        combo = (fn.__name__, label.split()[0])
        forms = [True] + ([False] if combo not in fallback_done else [])
        fallback_done.add(combo)
        for aligned in forms:
            src = ASTSource(fn=fn, signature=sig, constexprs=const,
                            attrs=_aligned_attrs(fn, sig) if aligned else None)
            with _ptxas_log() as log:
                try:
                    compiled = triton.compile(src, target=target, options=opts)
                except Exception as e:  # re-raise with the variant that failed
                    raise RuntimeError(f"triton.compile failed for {fn.__name__} [{label}] "
                                       f"{'aligned' if aligned else 'unaligned'} sm_{arch}: {e}") from e
            cubin = compiled.asm.get("cubin")
            if not cubin:
                raise RuntimeError(f"no cubin produced for {fn.__name__} [{label}] sm_{arch}")
            results.append((fn.__name__, label, len(cubin), ptxas_report(log.getvalue()) if log else None,
                            aligned))
    return results


def main(argv=None) -> int:
    """`python -m linft_kernels.triton._compile [--arch 90] [--out FILE.json]`: compile every variant
    and print (and write) each one's ptxas report."""
    import argparse
    import datetime
    import json
    import os
    import tempfile

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default=None, help="write the reports as JSON rows here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: ptxas really runs for each variant
        os.environ["TRITON_CACHE_DIR"] = cache
        res = compile_all(args.arch)
    rows = [dict(kernel=name, variant=label, aligned=aligned, cubin_bytes=n, **(rep or {}))
            for name, label, n, rep, aligned in res]
    for r in rows:
        print(f"{r['kernel']:<24} {r['variant']:<72} {'aligned' if r['aligned'] else 'plain':<8} "
              f"regs {r.get('registers', '?'):>3}  spill st/ld {r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}")
    if args.out:
        meta = dict(arch=f"sm_{args.arch}", triton=triton.__version__,
                    date=datetime.date.today().isoformat())
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
