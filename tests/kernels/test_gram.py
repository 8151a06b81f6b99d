"""gram: every backend against a float64 oracle, symmetric and cross forms, accumulation, dtypes."""
import pytest
import torch
from linft_testing import assert_close_to_oracle, backend_params, randn

import linft_kernels as lk
from linft_kernels import _native

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (N, M, P): single row, odd sizes, sizes just past block multiples, N != M.
SHAPES = [(1, 1, 1), (1, 3, 17), (7, 7, 33), (19, 5, 130), (33, 40, 257), (65, 65, 70)]
SMALL = [(1, 1, 1), (7, 5, 33), (19, 19, 40)]


def _shapes(backend):
    return SMALL if backend == "triton" else SHAPES


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_gram_matches_oracle(backend, device, dtype, symmetric):
    for N, M, P in _shapes(backend):
        a = randn(N, P, dtype=dtype, device=device)
        b = None if symmetric else randn(M, P, dtype=dtype, device=device)
        out = lk.gram(a, b, backend=backend)
        a64 = a.double().cpu()
        b64 = a64 if symmetric else b.double().cpu()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert out.dtype == acc
        assert_close_to_oracle(out, a64 @ b64.T, acc, what=f"gram {backend} {dtype} N={N} M={M} P={P}")
        if symmetric:  # mirrored tiles must be exactly symmetric
            assert torch.equal(out, out.T)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_gram_accumulates_into_out(backend, device, out_dtype, symmetric):
    """Streaming use: out += a b^T chunk by chunk over P equals one call over all of P."""
    N, M, P = (9, 9, 61) if symmetric else (9, 14, 61)
    a = randn(N, P, dtype=torch.bfloat16, device=device)
    b = a if symmetric else randn(M, P, dtype=torch.bfloat16, device=device)
    start = randn(N, M, dtype=out_dtype, device=device)
    if symmetric:
        start = start + start.T
    out = start.clone()
    for p0 in range(0, P, 20):  # chunks of 20, 20, 20, 1
        res = lk.gram(a[:, p0:p0 + 20], None if symmetric else b[:, p0:p0 + 20], out=out, backend=backend)
        assert res is out
    oracle = start.double().cpu() + a.double().cpu() @ b.double().cpu().T
    assert_close_to_oracle(out, oracle, out_dtype, what=f"gram accumulate {backend}")


@pytest.mark.parametrize("backend,device", backend_params())
def test_gram_fp64_out_from_low_precision(backend, device):
    """An fp64 out accumulates bf16/fp16 inputs in fp64: exact to fp64 rounding."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        a = randn(11, 300, dtype=dtype, device=device)
        out = torch.zeros(11, 11, dtype=torch.float64, device=device)
        lk.gram(a, out=out, backend=backend)
        a64 = a.double().cpu()
        assert_close_to_oracle(out, a64 @ a64.T, torch.float64, what=f"gram fp64 out {dtype}")


@pytest.mark.parametrize("backend,device", backend_params())
def test_gram_empty(backend, device):
    a = randn(0, 5, device=device)
    assert lk.gram(a, backend=backend).shape == (0, 0)
    a = randn(3, 0, device=device)
    assert torch.equal(lk.gram(a, backend=backend), torch.zeros(3, 3, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("blocks", [1, 3, 8, 50])
def test_cpu_blas_path_blocks(dtype, blocks):
    """Same-dtype CPU gram goes through the vendor GEMM in diagonal blocks: any block count (more
    blocks than rows too) accumulates the exact-symmetric product into out."""
    from linft_kernels import _blas
    a = randn(37, 53, dtype=dtype)
    start = randn(37, 37, dtype=dtype)
    start = start + start.T
    assert _blas.applies(a, None, start)
    out = _blas.gram(a, None, start.clone(), blocks=blocks, min_rows=1)
    two = _blas.gram(a, None, start.clone(), blocks=blocks, min_rows=4, levels=2)  # nested strips
    assert_close_to_oracle(two, start.double() + a.double() @ a.double().T, dtype, what=f"nested {blocks}")
    assert torch.equal(two, two.T)
    acc = dtype
    assert_close_to_oracle(out, start.double() + a.double() @ a.double().T, acc, what=f"blas sym {blocks}")
    assert torch.equal(out, out.T)
    b = randn(11, 53, dtype=dtype)
    cross = _blas.gram(a, b, torch.zeros(37, 11, dtype=dtype))
    assert_close_to_oracle(cross, a.double() @ b.double().T, acc, what="blas cross")
    assert not _blas.applies(a.to(torch.bfloat16), None, start)
    assert not _blas.applies(a.float(), None, start.double())
    # the default keeps strips >= 256 rows: a small N is one strip (the plain product)
    one = _blas.gram(a, None, torch.zeros(37, 37, dtype=dtype))
    assert_close_to_oracle(one, a.double() @ a.double().T, acc, what="blas one strip")


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                             (torch.float64, torch.float64), (torch.bfloat16, torch.float64)],
                         ids=str)
def test_cpu_few_rows_symmetric_gram(dtype, out_dtype):
    """The native kernel's single-pack path for symmetric Grams of few rows: odd row counts, P past
    the split-K chunk multiples, added into a nonzero out; the float64 oracle, exactly symmetric, and
    bitwise equal in its upper triangle to the native cross product of the same rows (same sums in
    the same order: the path only skips work, it does not reorder it). `gram` on CPU sends 96-256
    rows over P >= 16384 there instead of torch's GEMM (`_blas.few_rows`)."""
    from linft_kernels import _blas, _native
    from linft_testing import native_cpu_available
    if not native_cpu_available():
        pytest.skip("native CPU library not built")
    lib = _native.cpu_lib()
    P = 16384 + 4096 + 37
    for N in (1, 13, 33, 97, 129, 256):
        a = randn(N, P, dtype=dtype)
        start = randn(N, N, dtype=out_dtype)
        start = start + start.T
        out = start.clone()
        if N >= 96:
            assert not _blas.applies(a, None, start)  # routed to the native kernel
            lk.gram(a, out=out, backend="cpu")
        else:
            _native.gram(lib, a, None, out)
        oracle = start.double() + a.double() @ a.double().T
        assert_close_to_oracle(out, oracle, out_dtype, what=f"few-rows gram N={N} {dtype}->{out_dtype}")
        assert torch.equal(out, out.T)
        sym, cross = torch.zeros(N, N, dtype=out_dtype), torch.zeros(N, N, dtype=out_dtype)
        _native.gram(lib, a, None, sym)
        _native.gram(lib, a, a.clone(), cross)
        assert torch.equal(torch.triu(sym), torch.triu(cross)), f"N={N}: symmetric path reorders the sums"
    wide = randn(257, 16384)
    assert _blas.applies(wide, None, torch.zeros(257, 257))  # more rows: torch's GEMM in strips
    assert _blas.applies(randn(128, 16383), None, torch.zeros(128, 128))  # shorter P: torch's GEMM
    assert _blas.applies(randn(95, 16384), None, torch.zeros(95, 95))  # fewer rows: torch's GEMM


def _run_with_env(code: str, **env) -> dict:
    """Run `code` in a fresh Python with these environment variables (read once when the native
    library loads) and return the dict it prints last (repr)."""
    import os
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return eval(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpu_few_rows_symmetric_gram_other_isas(isa):
    """The single-pack symmetric path with the AVX2 and baseline register tiles (LINFT_CPU_ISA caps
    the engine; this machine otherwise runs AVX-512): the float64 oracle, and upper triangles bitwise
    equal to the cross product's, fp32 and fp64 accumulators, rows not a multiple of any tile."""
    from linft_testing import native_cpu_available
    if not native_cpu_available():
        pytest.skip("native CPU library not built")
    code = r'''
import torch
from linft_kernels import _native
lib = _native.cpu_lib()
torch.manual_seed(0)
res = {"isa": lib.build_info().get("simd")}
for N, P, dt, od in [(1, 300, torch.float32, torch.float32), (13, 16500, torch.float32, torch.float32),
                     (37, 700, torch.float32, torch.float64), (130, 16400, torch.float64, torch.float64)]:
    a = torch.randn(N, P, dtype=torch.float64).to(dt)
    sym, cross = torch.zeros(N, N, dtype=od), torch.zeros(N, N, dtype=od)
    _native.gram(lib, a, None, sym)
    _native.gram(lib, a, a.clone(), cross)
    ref = a.double() @ a.double().T
    err = ((sym.double() - ref).abs().max() / ref.abs().max()).item()
    res[f"{N},{P},{dt}"] = (err, bool(torch.equal(torch.triu(sym), torch.triu(cross))), bool(torch.equal(sym, sym.T)))
print(repr(res))
'''
    res = _run_with_env(code, LINFT_CPU_ISA=isa)
    assert res["isa"] == isa
    for key, val in res.items():
        if key == "isa":
            continue
        err, same, symmetric = val
        tol = 1e-12 if "float64" in key else 2e-6
        assert err < tol and same and symmetric, f"{isa} {key}: err {err:.2e} same {same} symmetric {symmetric}"


def test_cpu_bf16_amx_and_portable_paths_agree(tmp_path):
    """bf16 -> fp32 gram on CPU runs on AMX tiles where the CPU has them; LINFT_NO_AMX=1 forces the
    portable packed kernel. Both must give the float64 oracle (fp32 accumulation) for odd shapes,
    symmetric (exactly symmetric) and cross, accumulated into out, over one k chunk and several (the
    AMX accumulators carried across chunks), and with LINFT_AMX_ACC_BLOCKS=4 (accumulators for at
    most 4 blocks: the output in bands of one 32-row block row each). Where this process can use AMX,
    the runs without LINFT_NO_AMX must have used it."""
    from linft_kernels import _native
    from linft_testing import native_cpu_available
    if not native_cpu_available():
        pytest.skip("native CPU library not built")
    code = r'''
import sys, torch, linft_kernels as lk
from linft_kernels import _native
torch.manual_seed(0)
res = {"amx": _native.cpu_lib().build_info()["amx_bf16"]}
for N, M, P in [(1, None, 1), (37, None, 100), (37, 53, 70), (65, None, 4200), (33, 17, 2049),
                (300, None, 2100), (290, 70, 4097)]:
    a = torch.randn(N, P).bfloat16(); b = None if M is None else torch.randn(M, P).bfloat16()
    start = torch.randn(N, N if M is None else M)
    if M is None: start = start + start.T
    out = lk.gram(a, b, out=start.clone(), backend="cpu")
    ref = start.double() + a.double() @ (a if b is None else b).double().T
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    sym = bool(torch.equal(out, out.T)) if b is None else True
    res[f"{N},{M},{P}"] = (err, sym)
print(repr(res))
'''
    outs = {}
    for off, acc in (("0", ""), ("0", "4"), ("1", "")):
        outs[off + acc] = _run_with_env(code, LINFT_NO_AMX=off, LINFT_AMX_ACC_BLOCKS=acc)
    assert outs["1"]["amx"] is False  # turned off
    if _native.cpu_lib().build_info()["amx_bf16"]:
        assert outs["0"]["amx"] is True and outs["04"]["amx"] is True
    for off, res in outs.items():
        for key, val in res.items():
            if key == "amx":
                continue
            err, sym = val
            assert err < 2e-5 and sym, f"LINFT_NO_AMX, ACC_BLOCKS = {off}: {key}: err {err:.2e} symmetric {sym}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
@pytest.mark.parametrize("path", ["wgmma", "wgmma overlap", "mma.sync"])
def test_native_cuda_gram_tensor_core_shapes(dtype, symmetric, path, monkeypatch):
    """Shapes that take the native CUDA tensor-core kernels (16-bit inputs, fp32 out, P % 8 == 0;
    csrc/README.md), on Hopper's wgmma kernel (both forms: LINFT_CUDA_GRAM_WGMMA=2 is the second) and
    on the mma.sync one (LINFT_CUDA_GRAM_WGMMA=0; the switch is read at every call): edge tiles, P
    not a multiple of the K chunk (32 for mma.sync, 64 for wgmma), every pipeline stage reused, 2x2
    tiles, split-K. A symmetric start must stay exactly symmetric.
    The same cases run on the CPU in tests/cuda_emu (device 0 runs wgmma there, device 2 mma.sync)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    lib = _native.cuda_lib()
    if lib is None:
        pytest.fail(f"the native CUDA library did not load: {_native.load_error('_C_cuda')}")
    if path.startswith("wgmma"):
        if path == "wgmma overlap":
            monkeypatch.setenv("LINFT_CUDA_GRAM_WGMMA", "2")
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("wgmma needs a compute capability 9.0 GPU")
        archs = lib.build_info()["archs"].split(";")
        if "90a" not in archs:
            pytest.skip("the native library was built without sm_90a (LINFT_CUDA_ARCHS)")
        if "90" in archs:  # then the driver chooses which of the two a 9.0 GPU loads
            pytest.skip("the native library also holds plain sm_90 code (LINFT_CUDA_ARCHS): build 90a alone")
    else:
        monkeypatch.setenv("LINFT_CUDA_GRAM_WGMMA", "0")
        if torch.cuda.get_device_capability()[0] < 8:
            pytest.skip("mma.sync with bf16 needs sm_80 or newer")
    # on a 9.0 GPU with the sm_90a build, the probe must find that code loaded (and the switch read)
    assert lib.gram_tensor_core_path() == path
    # and auto sends 16-bit Grams into fp32 to this kernel exactly where it runs on wgmma (_dispatch)
    from linft_kernels import _dispatch
    auto = _dispatch._auto_order(torch.device("cuda"), "gram", torch.float32, tensor_cores=True)[0]
    assert auto == ("cuda" if path.startswith("wgmma") else "triton"), (path, auto)
    for N, M, P in [(5, 3, 8), (37, 21, 40), (130, 150, 72), (71, 100, 200), (129, 129, 392),
                    (33, 40, 1032), (300, 260, 4096)]:
        M = N if symmetric else M
        a = randn(N, P, dtype=dtype, device="cuda")
        b = None if symmetric else randn(M, P, dtype=dtype, device="cuda")
        start = randn(N, M, device="cuda")
        if symmetric:
            start = start + start.T
        out = start.clone()
        lk.gram(a, b, out=out, backend="cuda")
        a64 = a.double().cpu()
        b64 = a64 if symmetric else b.double().cpu()
        oracle = start.double().cpu() + a64 @ b64.T
        assert_close_to_oracle(out, oracle, torch.float32, what=f"gram {path} {dtype} N={N} M={M} P={P}")
        if symmetric:
            assert torch.equal(out, out.T)
