"""ghost_gram: every backend against explicit per-sample gradients in float64."""
import importlib

import pytest
import torch
from factor_cases import cases, make
from linft_testing import assert_close_to_oracle, backend_params, psg_oracle, randn

import linft_kernels as lk

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("route", ["ghost", "auto"])
def test_ghost_gram_matches_oracle(backend, device, dtype, symmetric, masked, route):
    """route="ghost" runs the ghost kernels themselves; "auto" may take the materializing route."""
    for case in cases(backend):
        x1, g1, m1, x2, g2, m2 = make(case, dtype, device, symmetric, masked)
        out = lk.ghost_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, backend=backend, route=route)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert out.dtype == acc
        cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
        assert_close_to_oracle(out, psg_oracle(*cpu), acc, what=f"ghost {backend} {dtype} {case}")
        if masked and case[0] > 1:  # sample 0 is fully padded: its row is exactly zero
            assert torch.count_nonzero(out[0]) == 0


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_ghost_gram_accumulates(backend, device, symmetric):
    case = (4, 5, 6, 3, 17, 16)
    x1, g1, m1, x2, g2, m2 = make(case, torch.float32, device, symmetric, True)
    M = 4 if symmetric else 5
    start = randn(4, M, dtype=torch.float64, device=device)
    out = start.clone()
    lk.ghost_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, out=out, backend=backend, route="ghost")
    lk.ghost_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, out=out, backend=backend, route="materialize")
    cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
    assert_close_to_oracle(out, start.cpu() + 2 * psg_oracle(*cpu), torch.float64, what="ghost accumulate")


def test_ghost_gram_equals_torch_func_on_linear():
    """The math check: ghost_gram of a real nn.Linear's captured factors equals the Gram of
    per-sample gradients of a scalar output computed by torch.func (vmap over grad)."""
    torch.manual_seed(1)
    N, T, d_in, d_out = 5, 7, 11, 6
    layer = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
    head = torch.randn(d_out, dtype=torch.float64)
    x = torch.randn(N, T, d_in, dtype=torch.float64)
    mask = torch.ones(N, T, dtype=torch.uint8)
    mask[2, 4:] = 0

    def f(params, xi, mi):  # scalar output of one sample: masked sum of a readout of y
        y = torch.func.functional_call(layer, params, (xi,))
        return ((y @ head) * mi).sum()

    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, x, mask.double())
    jw = grads["weight"].flatten(1)
    jb = grads["bias"]
    # Output gradients dy/dt of the scalar: head at real tokens (captured by hand here).
    g = head.expand(N, T, d_out).clone()
    for backend in ["reference", "cpu"]:
        kw = lk.ghost_gram(x, g, mask1=mask, backend=backend)
        assert_close_to_oracle(kw, jw @ jw.T, torch.float64, what=f"W block {backend}")
        # Bias block: x = 1 everywhere gives (sum_t g_it) . (sum_s g_js).
        kb = lk.ghost_gram(torch.ones(N, T, 1, dtype=torch.float64), g, mask1=mask, backend=backend)
        assert_close_to_oracle(kb, jb @ jb.T, torch.float64, what=f"bias block {backend}")


def test_ghost_route_picks_fewer_multiply_adds():
    from linft_kernels.ops import ghost_route
    # long sequences, moderate width: building each gradient once is cheaper
    assert ghost_route(64, 64, 128, 128, 512, 512, True) == "materialize"
    # short sequences, wide layers: the T x S products are cheaper than d_in x d_out gradients
    assert ghost_route(256, 256, 4, 4, 4096, 4096, True) == "ghost"
    assert ghost_route(8, 3, 2, 5, 1024, 1024, False) == "ghost"


def test_ghost_route_is_checked():
    x, g = randn(2, 3, 4, dtype=torch.float32), randn(2, 3, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="route must be"):
        lk.ghost_gram(x, g, route="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_native_cuda_ghost_gram_tensor_core_shapes(dtype, symmetric):
    """Shapes that take the native CUDA tensor-core kernel (16-bit inputs, fp32 out, d_in and d_out
    multiples of 8; csrc/README.md): 64 x 128 tiles of the token product holding parts of a pair,
    one pair or many (T = 4), edge tiles, K chunks past the pipeline depth, NaN in masked tokens
    (their entries must never be read), a symmetric out exactly symmetric. The same cases run on the
    CPU in tests/cuda_emu (whose blocks run one after another, so only the GPU shows the symmetry)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    for N, M, T, S, d_in, d_out in [(3, 2, 70, 33, 16, 24), (2, 3, 150, 260, 136, 8),
                                    (40, 30, 130, 20, 8, 16), (1, 1, 5, 5, 2048, 512),
                                    (64, 50, 4, 3, 64, 32)]:
        x1, g1, m1, x2, g2, m2 = make((N, M, T, S, d_in, d_out), dtype, "cuda", symmetric, True)
        start = randn(N, N if symmetric else M, device="cuda")
        if symmetric:
            start = start + start.T
        cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
        for x, g, m in ((x1, g1, m1), (x2, g2, m2)):
            if x is not None:  # NaN where the mask is 0: a kernel that multiplies them in fails
                x.masked_fill_(m.unsqueeze(-1) == 0, float("nan"))
                g.masked_fill_(m.unsqueeze(-1) == 0, float("nan"))
        out = start.clone()
        lk.ghost_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, out=out, backend="cuda", route="ghost")
        oracle = start.double().cpu() + psg_oracle(*cpu)
        assert_close_to_oracle(out, oracle, torch.float32,
                               what=f"ghost mma {dtype} {N, M, T, S, d_in, d_out} sym={symmetric}")
        if symmetric:  # the bins of the upper triangle are mirrored once: a symmetric start stays so
            assert torch.equal(out, out.T)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
def test_triton_ghost_gram_t_split(device, symmetric, out_dtype):
    """Few pairs, long sequences: the Triton ghost kernel splits t into slices (here forced: 13
    tokens per slice, T = 37: slices end inside 16-token tiles) whose partial sums are added into out
    once; a symmetric start stays exactly symmetric, masked tokens (NaN there) count for nothing.
    In the interpreter on CPU, and compiled on a GPU."""
    pytest.importorskip("triton")
    from linft_testing import HAS_GPU
    if device == "cpu" and HAS_GPU:
        pytest.skip("a GPU machine runs Triton compiled, not interpreted: the cuda case covers it")
    tg = importlib.import_module("linft_kernels.triton.ghost_gram")  # the module, not the function
    N, M, T, S, d_in, d_out = 3, 4, 37, 21, 19, 17
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    x1, g1 = randn(N, T, d_in, dtype=dtype, device=device), randn(N, T, d_out, dtype=dtype, device=device)
    m1 = (torch.rand(N, T, device=device) > 0.3).to(torch.uint8)
    clean = x1.clone()
    x1[m1 == 0] = float("nan")
    x2 = g2 = m2 = None
    if not symmetric:
        x2, g2 = randn(M, S, d_in, dtype=dtype, device=device), randn(M, S, d_out, dtype=dtype, device=device)
        m2 = (torch.rand(M, S, device=device) > 0.3).to(torch.uint8)
    rows, cols = N, (N if symmetric else M)
    start = randn(rows, cols, dtype=out_dtype, device=device)
    if symmetric:
        start = start + start.T
    out = tg.ghost_gram(x1, g1, m1, x2, g2, m2, start.clone(), blocks=dict(BLOCK_T=16, BLOCK_D=16),
                        t_chunk=13)
    cpu = [None if t is None else t.cpu() for t in (clean, g1, m1, x2, g2, m2)]
    assert_close_to_oracle(out, start.cpu().double() + psg_oracle(*cpu), out_dtype, what="t split")
    if symmetric:
        assert torch.equal(out, out.T)
    whole = tg.ghost_gram(x1, g1, m1, x2, g2, m2, start.clone(), blocks=dict(BLOCK_T=16, BLOCK_D=16),
                          t_chunk=T)  # one slice: the direct path
    assert_close_to_oracle(whole, start.cpu().double() + psg_oracle(*cpu), out_dtype, what="one slice")


def test_triton_ghost_t_slices_fill_the_gpu():
    """The split's slice count: none for enough pairs or off a GPU, T_UNIT multiples otherwise."""
    pytest.importorskip("triton")
    from linft_kernels.triton.ghost_gram import T_UNIT, _SPLIT_PROGRAMS, _t_slices
    assert _t_slices(10_000, 4096, 132, None) == (1, 4096)      # many pairs
    assert _t_slices(36, 4096, None, None) == (1, 4096)         # not a GPU
    assert _t_slices(36, 48, 132, None) == (1, 48)              # a single T_UNIT
    slices, chunk = _t_slices(36, 512, 132, None)               # N = 8 symmetric, T = 512
    assert chunk % T_UNIT == 0 and slices * chunk >= 512 and (slices - 1) * chunk < 512
    assert slices == 512 // T_UNIT and 36 * slices <= _SPLIT_PROGRAMS * 132
    assert _t_slices(36, 37, 132, 16) == (3, 16)                # forced
    with pytest.raises(ValueError, match="t_chunk"):
        _t_slices(36, 37, 132, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_triton_ghost_gram_splits_few_pairs_on_a_gpu(symmetric):
    """On a GPU the split engages by itself for a few samples of long sequences, and agrees with
    the oracle (bf16 inputs, fp32 out); a symmetric result is exactly symmetric."""
    tg = importlib.import_module("linft_kernels.triton.ghost_gram")
    N, M, T, d_in, d_out = 2, 3, 300, 64, 48
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pairs = N * (N + 1) // 2 if symmetric else N * M
    assert tg._t_slices(pairs, T, sms, None)[0] > 1
    x1 = randn(N, T, d_in, dtype=torch.bfloat16, device="cuda")
    g1 = randn(N, T, d_out, dtype=torch.bfloat16, device="cuda")
    m1 = (torch.rand(N, T, device="cuda") > 0.2).to(torch.uint8)
    x2 = g2 = m2 = None
    if not symmetric:
        x2 = randn(M, T, d_in, dtype=torch.bfloat16, device="cuda")
        g2 = randn(M, T, d_out, dtype=torch.bfloat16, device="cuda")
        m2 = (torch.rand(M, T, device="cuda") > 0.2).to(torch.uint8)
    out = tg.ghost_gram(x1, g1, m1, x2, g2, m2, torch.zeros(N, N if symmetric else M, device="cuda"))
    cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
    assert_close_to_oracle(out, psg_oracle(*cpu), torch.float32, what="gpu t split")
    if symmetric:
        assert torch.equal(out, out.T)
