"""capture._sample_gradients: per-sample weight gradients F_i = g_i^T x_i of the `features` form (LoRA
and other small blocks), summed over tokens in fp32 (fp64 for fp64 factors), against float64."""
import pytest
import torch

from linft.capture import _sample_gradients


def _oracle(g, x):
    return g.double().transpose(1, 2) @ x.double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sample_gradients_cpu(dtype):
    torch.manual_seed(0)
    g, x = torch.randn(3, 37, 5).to(dtype), torch.randn(3, 37, 11).to(dtype)
    f = _sample_gradients(g, x)
    assert f.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # 16-bit factors are exact in fp32, so every dtype is held to its accumulator's rounding
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(f.double(), _oracle(g, x), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sample_gradients_cuda_16bit_accumulates_in_fp32(dtype):
    """On CUDA, 16-bit factors go into a GEMM with an fp32 output (no fp32 copies): the result must be
    the fp32-accumulated product, not one rounded to 16 bits (which would miss by ~1e-3)."""
    torch.manual_seed(0)
    g, x = torch.randn(4, 300, 24).to(dtype).cuda(), torch.randn(4, 300, 40).to(dtype).cuda()
    f = _sample_gradients(g, x)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f.double().cpu(), _oracle(g.cpu(), x.cpu()), rtol=1e-5, atol=1e-4)
