"""Import hygiene: no CUDA initialization, no compiler, and a working package without native libs."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, **env) -> str:
    e = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_import_does_not_initialize_cuda_or_load_heavy_modules():
    _run("""
        import sys, torch
        import linft_kernels, linft
        assert not torch.cuda.is_initialized(), "CUDA initialized at import"
        for mod in ("linft_kernels._C_cuda", "triton", "transformers", "peft"):
            assert mod not in sys.modules, mod + " imported at import time"
    """)


def test_linft_kernels_does_not_import_linft():
    _run("""
        import sys, linft_kernels, linft_kernels.ops, linft_kernels.reference
        assert "linft" not in sys.modules
    """)


def test_works_without_native_libraries():
    """With both native libraries unimportable, auto dispatch falls back to the reference backend,
    says why once, and an explicit native request raises with the reason."""
    out = _run("""
        import sys, importlib.abc, logging
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name in ("linft_kernels._C_cpu", "linft_kernels._C_cuda"):
                    raise ImportError("blocked by test: " + name)
        sys.meta_path.insert(0, Block())
        logging.basicConfig(level=logging.WARNING)
        import torch, linft_kernels as lk
        a = torch.randn(5, 7, dtype=torch.float64)
        torch.testing.assert_close(lk.gram(a), a @ a.T)
        x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
        lk.ghost_gram(x, g); lk.psg_gram(x, g, kernel="signgd")
        try:
            lk.gram(a, backend="cpu")
        except lk.BackendUnavailable as e:
            print("RAISED", e)
        from linft_kernels.__main__ import main
        main([])
    """, LINFT_BACKEND="")
    assert "RAISED gram: backend='cpu' cannot run" in out and "blocked by test" in out
    assert "using the 'reference' backend" in out


def test_diagnostic_runs():
    out = _run("from linft_kernels.__main__ import main; main([])")
    assert "native_cpu" in out and "ops on cpu tensors" in out and "psg_gram" in out
    assert "auto into fp32 (bf16 / fp32 inputs)" in out


def test_diagnostic_auto_column_is_per_op_and_input_width(monkeypatch):
    """`python -m linft_kernels` shows auto's pick per op for bf16 and fp32 inputs (the CUDA order
    depends on both), here on a simulated H200 whose native gram runs on wgmma."""
    from linft_kernels import __main__ as diag, _dispatch
    monkeypatch.setattr(_dispatch, "unavailable_reason", lambda b, d: None)
    monkeypatch.setattr(_dispatch, "_path_cache", {})
    monkeypatch.setattr(_dispatch, "_gram_path", lambda index: "wgmma")
    monkeypatch.setattr(diag.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(diag.torch.cuda, "current_device", lambda: 0)
    picks = {op: [diag._auto_choice("cuda", op, dt) for dt in (diag.torch.bfloat16, diag.torch.float32)]
             for op in ("gram", "ghost_gram", "psg_gram")}
    assert picks == {"gram": ["cuda", "triton"], "ghost_gram": ["cuda", "triton"], "psg_gram": ["triton", "triton"]}
