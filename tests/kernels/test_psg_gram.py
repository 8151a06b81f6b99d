"""psg_gram: every backend and kernel variant against explicit per-sample gradients in float64."""
import os

import pytest
import torch
from factor_cases import cases, make
from linft_testing import (assert_close_to_oracle, backend_params, per_sample_grads64, psg_oracle, randn,
                           random_mask, sign_flip_atol)

import linft_kernels as lk

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
KERNELS = ["sgd", "signgd", "asymmetric-signgd"]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_psg_gram_matches_oracle(backend, device, dtype, kernel, symmetric):
    for case in cases(backend):
        x1, g1, m1, x2, g2, m2 = make(case, dtype, device, symmetric, masked=True)
        out = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, mask1=m1, mask2=m2, backend=backend)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
        oracle = psg_oracle(*cpu, kernel=kernel)
        atol = sign_flip_atol(*cpu, kernel, acc)
        assert_close_to_oracle(out, oracle, acc, extra_atol=atol, what=f"psg {kernel} {backend} {dtype} {case}")


@pytest.mark.parametrize("backend,device", backend_params())
def test_psg_gram_sgd_equals_ghost_gram(backend, device):
    x1, g1, m1, x2, g2, m2 = make((6, 9, 8, 5, 21, 17), torch.float64, device, False, True)
    a = lk.psg_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, backend=backend)
    b = lk.ghost_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, backend=backend)
    assert_close_to_oracle(a, b, torch.float64, what="psg sgd vs ghost")


@pytest.mark.parametrize("backend,device", backend_params())
def test_psg_gram_accumulates_and_asymmetric_is_not_mirrored(backend, device):
    x1, g1, m1, *_ = make((5, 5, 6, 6, 17, 16), torch.float64, device, True, True)
    start = randn(5, 5, dtype=torch.float64, device=device)
    out = start.clone()
    lk.psg_gram(x1, g1, kernel="asymmetric-signgd", mask1=m1, out=out, backend=backend)
    oracle = start.cpu() + psg_oracle(x1.cpu(), g1.cpu(), m1.cpu(), kernel="asymmetric-signgd")
    assert_close_to_oracle(out, oracle, torch.float64, what="psg asym accumulate")
    res = out - start
    assert not torch.allclose(res, res.T)  # <F_i, sign F_j> is genuinely asymmetric


def test_psg_gram_equals_torch_func_on_linear():
    """The math check for every kernel variant: per-sample gradients of a real nn.Linear from
    torch.func, with sign taken explicitly, against psg_gram on the captured factors."""
    torch.manual_seed(2)
    N, M, T, d_in, d_out = 4, 3, 6, 9, 5
    layer = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)
    head = torch.randn(T, d_out, dtype=torch.float64)  # position-dependent readout
    x1, x2 = torch.randn(N, T, d_in, dtype=torch.float64), torch.randn(M, T, d_in, dtype=torch.float64)

    def f(params, xi):
        return (torch.func.functional_call(layer, params, (xi,)) * head).sum()

    params = {k: v.detach() for k, v in layer.named_parameters()}
    per_sample = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))
    j1 = per_sample(params, x1)["weight"].flatten(1)
    j2 = per_sample(params, x2)["weight"].flatten(1)
    g1, g2 = head.expand(N, T, d_out), head.expand(M, T, d_out)
    expected = {"sgd": j1 @ j2.T, "signgd": j1.sign() @ j2.sign().T, "asymmetric-signgd": j1 @ j2.sign().T}
    for backend in ["reference", "cpu"]:
        for kernel, want in expected.items():
            got = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, backend=backend)
            assert_close_to_oracle(got, want, torch.float64, what=f"psg {kernel} {backend} vs torch.func")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_psg_gram_fp32_tiles_with_fp64_out(backend, device, symmetric):
    """tile_dtype=float32, out fp64: F built in fp32, the Gram in fp64. Within fp32 accuracy of the
    float64 oracle, and really fp32 tiles: not the fp64-tile result."""
    x1, g1, m1, x2, g2, m2 = make((7, 5, 30, 25, 37, 45), torch.float32, device, symmetric, True)
    N, M = 7, (7 if symmetric else 5)
    mixed = lk.psg_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, backend=backend, tile_dtype=torch.float32,
                        out=torch.zeros(N, M, dtype=torch.float64, device=device))
    exact = lk.psg_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, backend=backend,
                        out=torch.zeros(N, M, dtype=torch.float64, device=device))
    cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
    oracle = psg_oracle(*cpu)
    assert_close_to_oracle(mixed, oracle, torch.float32, what=f"psg fp32 tiles {backend}")
    assert_close_to_oracle(exact, oracle, torch.float64, what=f"psg fp64 tiles {backend}")
    assert not torch.equal(mixed, exact)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_psg_gram_16bit_tiles(backend, device, dtype, out_dtype, symmetric):
    """tile_dtype = the factors' 16-bit dtype: each F entry summed over tokens in fp32 and rounded
    once to that dtype (as a 16-bit model's weight gradient is), the Gram accumulated in out's dtype.
    The oracle rounds the float64 F the same way; the result is far closer to it than to the
    unrounded Gram."""
    x1, g1, m1, x2, g2, m2 = make((7, 5, 30, 25, 37, 45), dtype, device, symmetric, True)
    N, M = 7, (7 if symmetric else 5)
    cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
    f1 = per_sample_grads64(*cpu[:3]).flatten(1)
    f2 = f1 if x2 is None else per_sample_grads64(*cpu[3:]).flatten(1)
    r1, r2 = (f.to(dtype).double() for f in (f1, f2))
    for kernel in ("sgd", "signgd"):
        got = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, mask1=m1, mask2=m2, backend=backend,
                          tile_dtype=dtype, out=torch.zeros(N, M, dtype=out_dtype, device=device))
        if kernel == "signgd":
            atol = sign_flip_atol(*cpu, kernel, torch.float32)
            assert_close_to_oracle(got, r1.sign() @ r2.sign().T, torch.float32, extra_atol=atol,
                                   what=f"psg 16-bit tiles signgd {backend}")
            continue
        rounded, exact = r1 @ r2.T, f1 @ f2.T
        one_ulp = 2.0 ** -7 * f1.abs().max().item() * f2.abs().max().item()  # a tie rounded the other way
        assert_close_to_oracle(got, rounded, torch.float32, extra_atol=one_ulp,
                               what=f"psg {dtype} tiles {backend} -> {out_dtype}")
        err_rounded = (got.double().cpu() - rounded).abs().max().item()
        err_exact = (got.double().cpu() - exact).abs().max().item()
        assert err_rounded < err_exact / 4, (err_rounded, err_exact)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_psg_gram_signgd_is_exact(backend, device, dtype, out_dtype, symmetric, monkeypatch):
    """signgd counts sign agreements: with small-integer factors (F exact in every dtype, zeros
    included) every backend gives the integer oracle exactly. The Triton kernel stores the signs in
    bf16 and multiplies them on bf16 operands (seen by its Gram's input dtype), fp64 outs through an
    exact fp32 scratch."""
    if out_dtype == torch.float32 and dtype == torch.float64:
        pytest.skip("fp64 factors need an fp64 out")
    gen = torch.Generator().manual_seed(13)

    def ints(*shape):
        return torch.randint(-2, 3, shape, generator=gen).to(dtype).to(device)

    N, M, T, S, d_in, d_out = 6, 5, 7, 4, 19, 23
    x1, g1 = ints(N, T, d_in), ints(N, T, d_out)
    x2, g2 = (None, None) if symmetric else (ints(M, S, d_in), ints(M, S, d_out))
    seen = []
    if backend == "triton":
        import importlib
        tpsg = importlib.import_module("linft_kernels.triton.psg_gram")
        real = tpsg._gram
        monkeypatch.setattr(tpsg, "_gram", lambda a, b, o, **k: seen.append(a.dtype) or real(a, b, o, **k))
    got = lk.psg_gram(x1, g1, x2, g2, kernel="signgd", backend=backend,
                      out=torch.zeros(N, N if symmetric else M, dtype=out_dtype, device=device))
    oracle = psg_oracle(x1.cpu(), g1.cpu(), None, None if x2 is None else x2.cpu(),
                        None if g2 is None else g2.cpu(), None, kernel="signgd")
    assert torch.equal(got.cpu().double(), oracle), (got.cpu().double() - oracle).abs().max()
    if backend == "triton":
        assert seen and set(seen) == {torch.bfloat16}


def test_psg_gram_tile_dtype_is_checked():
    x, g = randn(2, 3, 4, dtype=torch.float32), randn(2, 3, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs factors x and g of that dtype"):
        lk.psg_gram(x, g, tile_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tile_dtype must be"):
        lk.psg_gram(x, g, tile_dtype=torch.int8)
    with pytest.raises(ValueError, match="needs an fp64 out"):
        lk.psg_gram(x, g, tile_dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("one_dataset", [True, False], ids=["x2=None", "cross"])
def test_cpu_blas_psg_chunks(dtype, kernel, one_dataset):
    """Same-dtype CPU psg_gram goes through the vendor GEMM in (d_out, d_in) chunks (linft_kernels
    ._blas): chunk sizes that divide nothing, down to one output row, give the float64 oracle added
    into a nonzero out; masked tokens holding NaN add nothing; the symmetric form (one dataset, not
    asymmetric-signgd) is exactly symmetric."""
    from linft_kernels import _blas
    x1, g1, m1, x2, g2, m2 = make((9, 6, 11, 7, 23, 13), dtype, "cpu", one_dataset, True)
    masked = (m1 == 0).unsqueeze(-1)
    oracle_in = (x1.clone(), g1.clone())
    x1.masked_fill_(masked, float("nan"))
    g1.masked_fill_(masked, float("nan"))
    N, M = 9, 9 if one_dataset else 6
    sym = one_dataset and kernel != "asymmetric-signgd"
    start = randn(N, M, dtype=dtype)
    if sym:
        start = start + start.T
    oracle = start.double() + psg_oracle(*oracle_in, m1, x2, g2, m2, kernel=kernel)
    atol = sign_flip_atol(*oracle_in, m1, x2, g2, m2, kernel, dtype)
    assert _blas.psg_applies(x1, x2, start, None)
    for buffer, rows_out in [(1 << 23, 64), (15 * 5 * 7, 5), (15 * 16, 1)]:  # whole; 5x7 chunks; 1x16
        out = _blas.psg_gram(x1, g1, m1, x2, g2, m2, start.clone(), kernel, buffer=buffer,
                             rows_out=rows_out, min_rows=2)
        assert_close_to_oracle(out, oracle, dtype, extra_atol=atol,
                               what=f"blas psg {kernel} one_dataset={one_dataset} {dtype} buffer={buffer}")
        if sym:
            assert torch.equal(out, out.T)


@pytest.mark.parametrize("kernel", ["sgd", "signgd"])
def test_cpu_blas_psg_few_rows_chunk_gram(kernel):
    """Symmetric psg_gram on CPU whose chunks have >= 16384 entries and whose rows (samples x outputs)
    are few takes each chunk's Gram from the native few-rows kernel (whole symmetric Grams, not upper
    triangles): C = 2 per-output gradients, a masked token, a last chunk shorter than the others
    (below the few-rows size: torch's GEMM, also whole) all add up to the float64 oracle, exactly
    symmetric, with and without that kernel (few_rows_gram=None: torch's GEMM in strips)."""
    from linft_kernels import _blas, ops
    from linft_testing import native_cpu_available
    if not native_cpu_available():
        pytest.skip("native CPU library not built")
    torch.manual_seed(5)
    x, g = randn(48, 6, 131), randn(48, 2, 6, 200)  # 96 rows: samples x outputs
    m = torch.ones(48, 6, dtype=torch.uint8)
    m[3, 4:] = 0
    oracle = psg_oracle(*_repeat_per_output(x, g, m), None, None, None, kernel=kernel)
    atol = sign_flip_atol(*_repeat_per_output(x, g, m), None, None, None, kernel, torch.float32)
    calls = []

    def native(a, b, k):
        calls.append(a.shape)
        ops._run_gram(k, a, b, "cpu")

    rows_out = 128  # chunks of 128 x 131 (16768 entries: few rows) and a last one of 72 x 131
    assert _blas._psg_chunks(96, 131, 200, 96 * 128 * 131, rows_out) == (128, 131)
    assert _blas.few_rows(96, 128 * 131) and not _blas.few_rows(96, 72 * 131)
    for few_rows_gram in (native, None):
        out = _blas.psg_gram(x, g, m, None, None, None, torch.zeros(96, 96), kernel, buffer=96 * 128 * 131,
                             rows_out=rows_out, few_rows_gram=few_rows_gram)
        assert_close_to_oracle(out, oracle, torch.float32, extra_atol=atol,
                               what=f"few-rows psg {kernel} native={few_rows_gram is not None}")
        assert torch.equal(out, out.T)
    assert calls == [(96, 128 * 131), (96, 72 * 131)]  # every chunk's Gram went to few_rows_gram


def test_cpu_blas_psg_applies_when_tiles_are_in_the_factors_dtype():
    from linft_kernels import _blas
    x, o32, o64 = randn(2, 3, 4), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)
    assert _blas.psg_applies(x, None, o32, None) and _blas.psg_applies(x.double(), x.double(), o64, None)
    assert _blas.psg_applies(x, None, o64, torch.float32)  # fp32 tiles, fp64 Gram: the mixed mode
    assert not _blas.psg_applies(x, None, o64, None)  # fp64 tiles from fp32 factors: native
    assert not _blas.psg_applies(x.bfloat16(), None, o32, None)  # fp32 tiles from bf16 factors: native
    assert _blas.psg_applies(x.bfloat16(), None, o32, torch.bfloat16)  # bf16 tiles, Gram into fp32
    assert not _blas.psg_applies(x, x.double(), o32, None)
    with pytest.raises(ValueError, match="mixed-precision gram"):
        _blas.psg_gram(x, randn(2, 3, 5), None, None, None, None, o64)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("one_dataset", [True, False], ids=["x2=None", "cross"])
def test_cpu_blas_psg_mixed_fp32_tiles_fp64_gram(kernel, one_dataset):
    """fp32 factors into an fp64 out with tile_dtype=float32 on CPU: F chunks built in fp32 by the
    batched GEMM, each chunk's Gram by the native mixed-precision gram into fp64. Small chunks, C=2
    per-output gradients, masks: within fp32 accuracy of the float64 oracle, exactly symmetric where the
    kernel is, and the same numbers through ops.psg_gram (which routes this mode here)."""
    from linft_kernels import _blas, ops
    from linft_testing import native_cpu_available
    if not native_cpu_available():
        pytest.skip("native CPU library not built")
    torch.manual_seed(3)
    x1, g1 = randn(7, 9, 23), randn(7, 2, 9, 13)
    m1 = torch.ones(7, 9, dtype=torch.uint8)
    m1[2, 5:] = 0
    x2 = g2 = m2 = None
    if not one_dataset:
        x2, g2, m2 = randn(5, 6, 23), randn(5, 2, 6, 13), torch.ones(5, 6, dtype=torch.uint8)
    M = 14 if one_dataset else 10
    gram = lambda a, b, k: ops._run_gram(k, a, b, "cpu")  # noqa: E731
    out = _blas.psg_gram(x1, g1, m1, x2, g2, m2, torch.zeros(14, M, dtype=torch.float64), kernel, gram=gram,
                         buffer=14 * 4 * 7, rows_out=4)
    oracle = psg_oracle(*_repeat_per_output(x1, g1, m1), *_repeat_per_output(x2, g2, m2), kernel=kernel)
    atol = sign_flip_atol(*_repeat_per_output(x1, g1, m1), *_repeat_per_output(x2, g2, m2), kernel, torch.float32)
    assert_close_to_oracle(out, oracle, torch.float32, extra_atol=atol, what=f"blas mixed {kernel}")
    if one_dataset and kernel != "asymmetric-signgd":
        assert torch.equal(out, out.T)
    via_op = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, mask1=m1, mask2=m2, backend="cpu",
                         tile_dtype=torch.float32, out=torch.zeros(14, M, dtype=torch.float64))
    assert_close_to_oracle(via_op, oracle, torch.float32, extra_atol=atol, what=f"op mixed {kernel}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_native_cpu_psg_same_dtype(dtype, kernel):
    """The native CPU kernel for fp32/fp64 factors (ops route those to the BLAS path; the kernel stays
    callable through _native and is checked here): symmetric and cross against the oracle."""
    from linft_testing import native_cpu_available

    from linft_kernels import _native
    if not native_cpu_available():
        pytest.skip("native CPU library not built")
    lib = _native.cpu_lib()
    for symmetric in (True, False):
        x1, g1, m1, x2, g2, m2 = make((7, 5, 9, 8, 21, 11), dtype, "cpu", symmetric, True)
        u8 = [None if m is None else m.to(torch.uint8).contiguous() for m in (m1, m2)]
        out = torch.zeros(7, 7 if symmetric else 5, dtype=dtype)
        _native.psg_gram(lib, x1, g1, u8[0], x2, g2, u8[1], out, kernel, None)
        atol = sign_flip_atol(x1, g1, m1, x2, g2, m2, kernel, dtype)
        assert_close_to_oracle(out, psg_oracle(x1, g1, m1, x2, g2, m2, kernel=kernel), dtype, extra_atol=atol,
                               what=f"native psg {kernel} {dtype} sym={symmetric}")


def _repeat_per_output(x, g, m):
    """The 3-D factors equivalent to g (N, C, T, d_out): rows i*C + a, x and mask repeated."""
    if x is None:
        return None, None, None
    N, C, T, d = g.shape
    return (x.repeat_interleave(C, dim=0), g.reshape(N * C, T, d),
            None if m is None else m.repeat_interleave(C, dim=0))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_psg_gram_per_output_gradients(backend, device, kernel, symmetric):
    """g of shape (N, C, T, d_out): C outputs sharing each sample's input give out (N*C, M*C2) with row
    i*C + a, equal to the 3-D call on x repeated per output (C2 != C in the cross form)."""
    torch.manual_seed(5)
    N, M, T, S, d_in, d_out, C, C2 = 5, 4, 6, 7, 19, 11, 3, 2
    x1, g1 = randn(N, T, d_in, dtype=torch.float64), randn(N, C, T, d_out, dtype=torch.float64)
    m1 = torch.ones(N, T, dtype=torch.uint8)
    m1[1, 4:] = 0
    x2 = g2 = m2 = None
    if not symmetric:
        x2, g2 = randn(M, S, d_in, dtype=torch.float64), randn(M, C2, S, d_out, dtype=torch.float64)
        m2 = torch.ones(M, S, dtype=torch.uint8)
        m2[2, 3:] = 0
    dev = [None if t is None else t.to(device) for t in (x1, g1, m1, x2, g2, m2)]
    got = lk.psg_gram(dev[0], dev[1], dev[3], dev[4], kernel=kernel, mask1=dev[2], mask2=dev[5], backend=backend)
    assert got.shape == (N * C, (N * C) if symmetric else M * C2)
    oracle = psg_oracle(*_repeat_per_output(x1, g1, m1), *_repeat_per_output(x2, g2, m2), kernel=kernel)
    assert_close_to_oracle(got, oracle, torch.float64, what=f"psg per-output {kernel} {backend}")
    if symmetric and kernel != "asymmetric-signgd":
        assert torch.equal(got, got.T)


def test_cpu_blas_psg_per_output_chunks():
    """The CPU path builds the C outputs' rows from one x in chunks and interleaves them: small chunks,
    fp32, cross with C1=3, C2=2 and symmetric with C=3, accumulated into a nonzero out."""
    from linft_kernels import _blas
    x1, g1 = randn(6, 8, 21), randn(6, 3, 8, 10)
    x2, g2 = randn(4, 5, 21), randn(4, 2, 5, 10)
    m1 = torch.ones(6, 8, dtype=torch.uint8)
    m1[0] = 0
    for x2_, g2_, M in [(None, None, 18), (x2, g2, 8)]:
        start = randn(18, M)
        if x2_ is None:
            start = start + start.T
        out = _blas.psg_gram(x1, g1, m1, x2_, g2_, None, start.clone(), "sgd", buffer=18 * 3 * 7, rows_out=3,
                             min_rows=2)
        oracle = start.double() + psg_oracle(*_repeat_per_output(x1, g1, m1), *_repeat_per_output(x2_, g2_, None))
        assert_close_to_oracle(out, oracle, torch.float32, what=f"blas per-output M={M}")


def test_psg_gram_per_output_shape_errors():
    x, g = randn(2, 3, 4), randn(2, 2, 3, 5)
    with pytest.raises(ValueError, match="token count"):
        lk.psg_gram(x, randn(2, 2, 4, 5))
    with pytest.raises(ValueError, match="sample count"):
        lk.psg_gram(x, randn(3, 2, 3, 5))
    with pytest.raises(ValueError, match=r"\(N, T, d_out\) or \(N, C, T, d_out\)"):
        lk.psg_gram(x, randn(2, 3))
    with pytest.raises(ValueError, match="4 dimensions|3 dimensions"):
        lk.ghost_gram(x, g)  # per-output gradients are a psg_gram form only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_blas_psg_on_cuda_with_16bit_tiles(dtype, symmetric):
    """The cuBLAS route that bench/harness.py times on a GPU (`_blas.psg_gram` on CUDA tensors with
    `_blas.cuda_gram_fp32`): F built in chunks, each entry summed over tokens in fp32 and rounded once
    to 16 bits, the chunks' Grams accumulated in fp32; closer to the rounded-F oracle than to the exact
    one, masked tokens (holding NaN) add nothing, the symmetric form exactly symmetric; cuBLAS's
    reduced-precision flags are as they were afterwards."""
    from linft_kernels import _blas
    flags = torch.backends.cuda.matmul
    names = [n for n in ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction",
                         "allow_bf16_reduced_precision_reduction_split_k",
                         "allow_fp16_reduced_precision_reduction_split_k") if hasattr(flags, n)]
    before = {n: getattr(flags, n) for n in names}
    x1, g1, m1, x2, g2, m2 = make((7, 5, 30, 25, 37, 45), dtype, "cuda", symmetric, True)
    cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
    g1.masked_fill_((m1 == 0).unsqueeze(-1), float("nan"))
    N, M = 7, (7 if symmetric else 5)
    f1 = per_sample_grads64(*cpu[:3]).flatten(1)
    f2 = f1 if x2 is None else per_sample_grads64(*cpu[3:]).flatten(1)
    r1, r2 = (f.to(dtype).double() for f in (f1, f2))
    one_ulp = 2.0 ** -7 * f1.abs().max().item() * f2.abs().max().item()
    for kernel in ("sgd", "signgd"):
        for buffer, rows_out in [(1 << 26, 256), ((N + M) * 8 * 37, 8)]:  # one chunk; 8 x 37 chunks
            got = _blas.psg_gram(x1, g1, m1, x2, g2, m2, torch.zeros(N, M, device="cuda"), kernel,
                                 gram=_blas.cuda_gram_fp32, buffer=buffer, rows_out=rows_out)
            what = f"cublas psg {kernel} {dtype} buffer={buffer}"
            if kernel == "signgd":
                atol = sign_flip_atol(*cpu, kernel, torch.float32)
                assert_close_to_oracle(got, r1.sign() @ r2.sign().T, torch.float32, extra_atol=atol, what=what)
            else:
                assert_close_to_oracle(got, r1 @ r2.T, torch.float32, extra_atol=one_ulp, what=what)
                err_rounded = (got.double().cpu() - r1 @ r2.T).abs().max().item()
                assert err_rounded < (got.double().cpu() - f1 @ f2.T).abs().max().item() / 4, what
            if symmetric:
                assert torch.equal(got, got.T), what
    assert {n: getattr(flags, n) for n in names} == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_blas_psg_turns_off_16bit_reductions_on_cuda_and_restores_them(dtype):
    """While _blas builds 16-bit per-sample gradients of CUDA tensors, cuBLAS's reduced-precision
    reduction flag for that dtype is off, its split-K companion untouched; afterwards both are what
    they were, also for a user's (False, False) and after an error. (The flags are process-wide
    settings that this CPU build of torch stores too; a stand-in with .device and .dtype is used.)"""
    from types import SimpleNamespace

    from linft_kernels import _blas
    flags = torch.backends.cuda.matmul
    name = "allow_bf16_reduced_precision_reduction" if dtype == torch.bfloat16 else "allow_fp16_reduced_precision_reduction"
    has_split = hasattr(flags, name + "_split_k")
    state = lambda: (getattr(flags, name), getattr(flags, name + "_split_k", None))  # noqa: E731
    original = state()
    fake = SimpleNamespace(device=torch.device("cuda"), dtype=dtype)
    try:
        for user in ([(True, True), (False, False), (False, True)] if has_split else [True, False]):
            setattr(flags, name, user)
            before = state()
            with _blas._sums_in_fp32(fake):
                assert state() == (False, before[1])
            assert state() == before
            with pytest.raises(RuntimeError, match="boom"):
                with _blas._sums_in_fp32(fake):
                    raise RuntimeError("boom")
            assert state() == before
        with _blas._sums_in_fp32(SimpleNamespace(device=torch.device("cpu"), dtype=dtype)):
            assert state() == before  # CPU tensors: nothing to change
    finally:
        setattr(flags, name, original if has_split else original[0])


def _route_case(dtype, device, symmetric):
    """Factors for the cuBLAS + Triton psg route: per-output g (C=2; C2=3 in the cross form), masks
    with NaN in every masked token of g, and the rounded-F oracle's rows (i*C + a)."""
    N, M, T, S, d_in, d_out, C, C2 = 7, 5, 30, 25, 37, 45, 2, 3
    x1, g1 = randn(N, T, d_in, dtype=dtype), randn(N, C, T, d_out, dtype=dtype)
    m1 = random_mask(N, T)
    x2 = g2 = m2 = None
    if not symmetric:
        x2, g2, m2 = randn(M, S, d_in, dtype=dtype), randn(M, C2, S, d_out, dtype=dtype), random_mask(M, S)
    f1 = per_sample_grads64(*_repeat_per_output(x1, g1, m1)).flatten(1)
    f2 = f1 if x2 is None else per_sample_grads64(*_repeat_per_output(x2, g2, m2)).flatten(1)
    atol = {k: sign_flip_atol(*_repeat_per_output(x1, g1, m1), *_repeat_per_output(x2, g2, m2), k, torch.float32)
            for k in KERNELS}
    for g, m in ((g1, m1), (g2, m2)):
        if g is not None:
            g.masked_fill_((m == 0)[:, None, :, None], float("nan"))
    dev = [None if t is None else t.to(device) for t in (x1, g1, m1, x2, g2, m2)]
    return dev, f1, f2, atol


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunks"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
def test_triton_backend_16bit_tiles_build_f_by_gemm(dtype, symmetric, chunked, out_dtype, monkeypatch):
    """The Triton backend's psg_gram with 16-bit tiles on a GPU builds F by torch's batched GEMM and
    takes each chunk's Gram from the Triton gram into an fp32 out, from torch's fp64 GEMM into an fp64
    one (ops._psg_gemm_then_triton_gram). Forced here for CPU tensors (the interpreter), through
    lk.psg_gram: every kernel, F whole and in chunks, per-output g, masked tokens holding NaN, fp32
    and fp64 outs added into, against the rounded-F oracle; the symmetric form exactly symmetric."""
    from linft_kernels import _blas, ops
    assert ops._psg_by_gemm(torch.device("cuda"), dtype)
    assert not ops._psg_by_gemm(torch.device("cuda"), None) and not ops._psg_by_gemm(torch.device("cpu"), dtype)
    monkeypatch.setattr(ops, "_psg_by_gemm", lambda device, tile: tile in (torch.bfloat16, torch.float16))
    if chunked:  # chunks along d_out and d_in (14 rows in the symmetric form: 20 x 16 entries each)
        monkeypatch.setattr(_blas, "PSG_BUFFER_GPU", 14 * 20 * 16 * (4 if out_dtype == torch.float64 else 1))
    routes, grams = [], []
    real_route, real_gram, real_fp64 = ops._psg_gemm_then_triton_gram, ops._run_gram, _blas.gram_fp64_copies
    monkeypatch.setattr(ops, "_psg_gemm_then_triton_gram", lambda *a: routes.append(1) or real_route(*a))
    monkeypatch.setattr(ops, "_run_gram", lambda o, a, b, be: grams.append(be) or real_gram(o, a, b, be))
    monkeypatch.setattr(_blas, "gram_fp64_copies", lambda a, b, k: grams.append("fp64 gemm") or real_fp64(a, b, k))
    (x1, g1, m1, x2, g2, m2), f1, f2, atol = _route_case(dtype, "cpu", symmetric)
    r1, r2 = (f.to(dtype).double() for f in (f1, f2))
    one_ulp = 2.0 ** -7 * f1.abs().max().item() * f2.abs().max().item()
    oracles = {"sgd": r1 @ r2.T, "signgd": r1.sign() @ r2.sign().T, "asymmetric-signgd": r1 @ r2.sign().T}
    for kernel, oracle in oracles.items():
        routes.clear()
        grams.clear()
        got = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, mask1=m1, mask2=m2, backend="triton", tile_dtype=dtype,
                          out=torch.full(oracle.shape, 0.5, dtype=out_dtype))
        got -= 0.5
        extra = one_ulp if kernel == "sgd" else atol[kernel]
        assert_close_to_oracle(got, oracle, torch.float32, extra_atol=extra, what=f"gemm route {kernel} {dtype}")
        assert routes == [1] and grams and set(grams) == {"fp64 gemm" if out_dtype == torch.float64 else "triton"}
        assert len(grams) > 1 if chunked else len(grams) == 1
        if symmetric and kernel != "asymmetric-signgd":
            assert torch.equal(got, got.T)


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunks"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
def test_triton_backend_16bit_tiles_take_the_gemm_route_on_gpu(symmetric, chunked, out_dtype, monkeypatch):
    """On a GPU, lk.psg_gram(backend="triton", tile_dtype=bf16) goes through the cuBLAS + Triton route
    (a spy sees it) and matches the rounded-F oracle for sgd and signgd, per-output g and NaN-holding
    masked tokens too, F whole and in chunks, into fp32 and fp64 outs."""
    from linft_kernels import _blas, ops
    if chunked:
        monkeypatch.setattr(_blas, "PSG_BUFFER_GPU", 14 * 20 * 16 * (4 if out_dtype == torch.float64 else 1))
    routes = []
    real_route = ops._psg_gemm_then_triton_gram
    monkeypatch.setattr(ops, "_psg_gemm_then_triton_gram", lambda *a: routes.append(1) or real_route(*a))
    (x1, g1, m1, x2, g2, m2), f1, f2, atol = _route_case(torch.bfloat16, "cuda", symmetric)
    r1, r2 = (f.to(torch.bfloat16).double() for f in (f1, f2))
    one_ulp = 2.0 ** -7 * f1.abs().max().item() * f2.abs().max().item()
    for kernel, oracle, extra in (("sgd", r1 @ r2.T, one_ulp), ("signgd", r1.sign() @ r2.sign().T, atol["signgd"])):
        routes.clear()
        got = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, mask1=m1, mask2=m2, backend="triton",
                          tile_dtype=torch.bfloat16, out=torch.zeros(oracle.shape, dtype=out_dtype, device="cuda"))
        assert routes == [1]
        assert_close_to_oracle(got, oracle, torch.float32, extra_atol=extra, what=f"gemm route on GPU {kernel}")
        if symmetric:
            assert torch.equal(got, got.T)


@pytest.mark.parametrize("kernel", ["sgd", "signgd"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunks"])
def test_blas_psg_mirrors_an_upper_triangle_gram(kernel, chunked):
    """gram_upper=True: the chunk Grams need be right only on and above the diagonal; the scratch is
    mirrored once at the end. A gram that leaves garbage below the diagonal still gives the oracle,
    exactly symmetric (per-output g, masked tokens)."""
    from linft_kernels import _blas
    torch.manual_seed(3)
    N, T, d_in, d_out, C = 6, 9, 13, 11, 2
    x, g = randn(N, T, d_in, dtype=torch.float64), randn(N, C, T, d_out, dtype=torch.float64)
    m = random_mask(N, T)

    def upper_only(a, b, k):
        assert b is None
        k += torch.triu(a @ a.T) + torch.tril(torch.full_like(k, 7.5), -1)  # garbage below the diagonal

    got = _blas.psg_gram(x, g, m, None, None, None, torch.zeros(N * C, N * C, dtype=torch.float64), kernel,
                         gram=upper_only, gram_upper=True, buffer=(N * C) * 4 * 5 if chunked else 1 << 20)
    oracle = psg_oracle(*_repeat_per_output(x, g, m), kernel=kernel)
    assert_close_to_oracle(got, oracle, torch.float64, what=f"gram_upper {kernel}")
    assert torch.equal(got, got.T)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunks"])
def test_native_cuda_psg_gram_tensor_core_shapes(dtype, symmetric, chunked, monkeypatch):
    """The native CUDA psg_gram on its tensor-core paths (csrc/README.md): phase 1 by the cp.async
    pipeline (d_in, d_out multiples of 8; several chunks of 32 tokens, 2 o tiles) and by plain loads
    (d_in = 130), F in fp32 and in the inputs' 16-bit dtype (then the Gram on tensor cores too), the
    plane whole or in chunks (LINFT_CUDA_PSG_SCRATCH_BYTES), NaN in masked tokens. Against float64
    oracles: the exact F's Gram for fp32 F, the rounded F's for 16-bit F. The same kinds of cases run
    on the CPU in tests/cuda_emu."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    if chunked:  # 4 KiB: every case below, 16-bit F included, in 2 to 17 chunks
        monkeypatch.setenv("LINFT_CUDA_PSG_SCRATCH_BYTES", str(4 << 10))
    for N, M, T, S, d_in, d_out in [(3, 2, 100, 70, 16, 136), (4, 4, 75, 75, 24, 40), (5, 3, 40, 33, 130, 24)]:
        x1, g1, m1, x2, g2, m2 = make((N, M, T, S, d_in, d_out), dtype, "cuda", symmetric, True)
        cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
        for x, g, m in ((x1, g1, m1), (x2, g2, m2)):
            if x is not None:  # NaN where the mask is 0: a kernel that multiplies them in fails
                x.masked_fill_(m.unsqueeze(-1) == 0, float("nan"))
                g.masked_fill_(m.unsqueeze(-1) == 0, float("nan"))
        f1 = per_sample_grads64(*cpu[:3]).flatten(1)
        f2 = f1 if x2 is None else per_sample_grads64(*cpu[3:]).flatten(1)
        r1, r2 = (f.to(dtype).double() for f in (f1, f2))
        one_ulp = 2.0 ** -7 * f1.abs().max().item() * f2.abs().max().item()  # a tie rounded the other way
        Mo = N if symmetric else M
        for kernel in ("sgd", "signgd"):
            atol = sign_flip_atol(*cpu, kernel, torch.float32)
            what = f"cuda psg {kernel} {dtype} {N, M, T, S, d_in, d_out} sym={symmetric} chunked={chunked}"
            got = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, mask1=m1, mask2=m2, backend="cuda")
            assert_close_to_oracle(got, psg_oracle(*cpu, kernel=kernel), torch.float32, extra_atol=atol,
                                   what=what + " fp32 F")
            got = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, mask1=m1, mask2=m2, backend="cuda",
                              tile_dtype=dtype, out=torch.zeros(N, Mo, device="cuda"))
            oracle = r1 @ r2.T if kernel == "sgd" else r1.sign() @ r2.sign().T
            assert_close_to_oracle(got, oracle, torch.float32, extra_atol=one_ulp if kernel == "sgd" else atol,
                                   what=what + " 16-bit F")
            if symmetric:
                assert torch.equal(got, got.T)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_masked_tokens_holding_nan_or_inf_contribute_nothing(backend, device, symmetric):
    """Masked tokens may hold anything (a model's padded positions can be NaN after a fully masked
    softmax): every backend selects them out rather than multiplying by 0, for psg_gram's kernels
    and for ghost_gram's both routes."""
    x1, g1, m1, x2, g2, m2 = make((5, 4, 9, 7, 13, 11), torch.float32, device, symmetric, True)
    cpu = [None if t is None else t.cpu().clone() for t in (x1, g1, m1, x2, g2, m2)]
    for x, g, m in ((x1, g1, m1), (x2, g2, m2)):
        if x is not None:
            x.masked_fill_(m.unsqueeze(-1) == 0, float("nan"))
            g.masked_fill_(m.unsqueeze(-1) == 0, float("inf"))
    for kernel in KERNELS:
        got = lk.psg_gram(x1, g1, x2, g2, kernel=kernel, mask1=m1, mask2=m2, backend=backend)
        assert_close_to_oracle(got, psg_oracle(*cpu, kernel=kernel), torch.float32,
                               extra_atol=sign_flip_atol(*cpu, kernel, torch.float32),
                               what=f"psg {kernel} {backend} with NaN/inf in masked tokens")
    for route in ("ghost", "materialize"):
        got = lk.ghost_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, backend=backend, route=route)
        assert_close_to_oracle(got, psg_oracle(*cpu), torch.float32,
                               what=f"ghost {route} {backend} with NaN/inf in masked tokens")
