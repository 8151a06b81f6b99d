"""The Triton gram launcher's tiling: grouped tile order over many tiles, split-K into a scratch,
fixed and autotuned block shapes. Runs in the interpreter here and compiled on a GPU."""
import pytest
import torch
from linft_testing import HAS_GPU, HAS_TRITON, assert_close_to_oracle, randn

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEVICE = "cuda" if HAS_GPU else "cpu"


def _gram():
    from linft_kernels.triton import gram
    return gram


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("group_m", [1, 2, 3])
def test_many_tiles_grouped_order_and_split_k(symmetric, split_k, group_m):
    # 16-row tiles: N=37 -> 3 tile rows (the last group is partial), M=53 -> 4 tile columns
    N, M, P = 37, 53, 83
    a = randn(N, P, dtype=torch.float32, device=DEVICE)
    b = None if symmetric else randn(M, P, dtype=torch.float32, device=DEVICE)
    start = randn(N, N if symmetric else M, dtype=torch.float64, device=DEVICE)
    if symmetric:
        start = start + start.T
    out = start.clone()
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=group_m)
    _gram()(a, b, out, blocks=blocks, split_k=split_k)
    a64 = a.double().cpu()
    b64 = a64 if symmetric else b.double().cpu()
    assert_close_to_oracle(out, start.cpu() + a64 @ b64.T, torch.float64,
                           what=f"triton gram tiles sym={symmetric} split={split_k} group={group_m}")
    if symmetric:
        assert torch.equal(out, out.T)


def test_split_k_larger_than_k_range_is_clamped():
    a = randn(5, 20, dtype=torch.float32, device=DEVICE)
    out = torch.zeros(5, 5, dtype=torch.float64, device=DEVICE)
    _gram()(a, None, out, blocks=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), split_k=50)
    assert_close_to_oracle(out, a.double().cpu() @ a.double().cpu().T, torch.float64, what="split clamp")


def test_bad_block_shape_is_named():
    a = randn(4, 8, dtype=torch.float32, device=DEVICE)
    out = torch.zeros(4, 4, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_K=24"):
        _gram()(a, None, out, blocks=dict(BLOCK_M=16, BLOCK_K=24))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_autotuned_gpu_gram_large(dtype):
    """The autotuned path on shapes past every block size, with split-K (few tiles, long P) and without."""
    for N, M, P in [(300, 300, 4099), (64, 64, 70000), (513, 257, 1000)]:
        a = randn(N, P, dtype=dtype, device="cuda")
        sym = M == N
        b = None if sym else randn(M, P, dtype=dtype, device="cuda")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        out = torch.zeros((N, M), dtype=acc, device="cuda")
        _gram()(a, b, out)
        a64 = a.double().cpu()
        b64 = a64 if sym else b.double().cpu()
        # fp32 operands run exact fp32 (ieee) by default; 16-bit ones are exact products
        assert_close_to_oracle(out, a64 @ b64.T, acc, what=f"autotuned {dtype} {N}x{M}x{P}")


@pytest.mark.parametrize("kernel", [0, 1, 2], ids=["sgd", "signgd", "asym"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_psg_gram_in_d_out_chunks(kernel, symmetric):
    """A scratch far too small for all of F: per-sample gradients are built d_out-chunk by chunk (the
    last chunk partial, tiles straddling a chunk's end) and the chunk Grams add up to the oracle."""
    from factor_cases import make
    from linft_testing import psg_oracle, sign_flip_atol

    from linft_kernels.triton import psg_gram
    x1, g1, m1, x2, g2, m2 = make((5, 4, 9, 7, 37, 45), torch.float32, DEVICE, symmetric, True)
    N, M = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    out = torch.zeros(N, M, dtype=torch.float64, device=DEVICE)
    d_in = x1.shape[2]
    rows = N if (symmetric and kernel != 2) else N + M
    psg_gram(x1, g1, m1, x2, g2, m2, out, kernel, scratch_bytes=rows * d_in * 8 * 7)  # 7 rows of F a chunk
    names = {0: "sgd", 1: "signgd", 2: "asymmetric-signgd"}
    cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
    assert_close_to_oracle(out, psg_oracle(*cpu, kernel=names[kernel]), torch.float64,
                           extra_atol=sign_flip_atol(*cpu, names[kernel], torch.float64),
                           what=f"psg chunks kernel={kernel} sym={symmetric}")


def test_split_k_heuristic_fills_two_waves():
    """Split-K only when the output tiles cannot fill the GPU: about two waves of programs over the
    multiprocessors (132 on an H100/H200), each split at least 8 K-blocks, at most MAX_SPLITS."""
    import importlib
    g = importlib.import_module("linft_kernels.triton.gram")
    assert g._split_k(tiles=3, P=786432, block_k=64, sms=132) == 88  # 264 programs: two full waves
    assert g._split_k(tiles=1, P=786432, block_k=64, sms=132) == g.MAX_SPLITS
    assert g._split_k(tiles=1, P=64 * 8 * 10, block_k=64, sms=132) == 10  # splits of >= 8 K-blocks
    assert g._split_k(tiles=132, P=786432, block_k=64, sms=132) == 1  # enough tiles already
    assert g._split_k(tiles=3, P=64 * 8 * 7, block_k=64, sms=132) == 1  # too short to split
