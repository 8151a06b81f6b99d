"""capture._sample_gradients: per-sample weight gradients F_i = g_i^T x_i of the `features` form (LoRA
and other small blocks) in the model's dtype, as its own weight gradients are: summed over tokens in
fp32 (fp64 for fp64 factors) and, for 16-bit factors, rounded once to 16 bits; against float64."""
import pytest
import torch

from linft.capture import _sample_gradients


def _oracle(g, x):
    return g.double().transpose(1, 2) @ x.double()


def _check(g, x):
    dtype = g.dtype
    f = _sample_gradients(g, x)
    assert f.dtype == dtype
    exact = _oracle(g.cpu(), x.cpu())
    if dtype in (torch.float64, torch.float32):
        tol = 1e-13 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(f.double().cpu(), exact, rtol=tol, atol=tol)
        return
    # fp32 sums rounded once: within one 16-bit spacing of an fp32 sum s, and s within tau of the exact
    # F, tau = 2^-20 * sum_t |g_t x_t| (an fp32 accumulation's error over these 300 tokens, with room
    # for tensor cores' truncating fp32 adds: it matters only for entries near zero, where one 16-bit
    # spacing is smaller than the fp32 sum's own error); 2 spacings off (a sum reduced in 16 bits) fails
    fi = torch.finfo(dtype)
    tau = 2.0 ** -20 * (g.double().abs().transpose(1, 2) @ x.double().abs()).cpu()
    mag = (exact.abs() + tau).clamp_min(fi.tiny)
    spacing = (torch.exp2(torch.floor(torch.log2(mag))) * fi.eps).clamp_min(fi.smallest_normal * fi.eps)
    err = (f.double().cpu() - exact).abs()
    worst = (err / (spacing + tau)).max().item()
    assert worst <= 1.0, f"an entry is {worst:.2f}x the allowed error (one {dtype} spacing + tau) off"
    acc16 = torch.zeros_like(g[:, 0, :, None] * x[:, 0, None, :])
    for t in range(g.shape[1]):  # what 16-bit accumulation would give
        acc16 = acc16 + g[:, t, :, None] * x[:, t, None, :]
    err = (f.double().cpu() - exact).abs().mean()
    assert err < (acc16.double().cpu() - exact).abs().mean() / 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sample_gradients_cpu(dtype):
    torch.manual_seed(0)
    _check(torch.randn(3, 300, 5).to(dtype), torch.randn(3, 300, 11).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_sample_gradients_cuda(dtype):
    torch.manual_seed(0)
    _check(torch.randn(4, 300, 24).to(dtype).cuda(), torch.randn(4, 300, 40).to(dtype).cuda())
