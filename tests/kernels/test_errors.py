"""Bad arguments raise errors that name the argument and the expected shape or type."""
import pytest
import torch
from linft_testing import randn

import linft_kernels as lk


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_gram_errors():
    a = randn(4, 6)
    _raises(ValueError, r"a must have shape \(N, P\)", lk.gram, randn(4, 6, 2))
    _raises(ValueError, r"b: the feature dimension P", lk.gram, a, randn(3, 5))
    _raises(TypeError, r"a has dtype torch.int32", lk.gram, torch.ones(4, 6, dtype=torch.int32))
    _raises(TypeError, r"b has dtype torch.float64 but a has torch.float32", lk.gram, a, randn(3, 6).double())
    _raises(ValueError, r"b is on meta but a is on cpu", lk.gram, a, torch.empty(3, 6, device="meta"))
    _raises(ValueError, r"out must have shape \(4, 4\)", lk.gram, a, out=torch.zeros(4, 3))
    _raises(TypeError, r"out has dtype torch.float16", lk.gram, a, out=torch.zeros(4, 4, dtype=torch.float16))
    _raises(ValueError, r"out must be contiguous", lk.gram, a, out=torch.zeros(4, 8)[:, ::2])
    _raises(ValueError, r"out is on meta", lk.gram, a, out=torch.empty(4, 4, device="meta"))
    _raises(TypeError, r"a must be a torch.Tensor", lk.gram, [[1.0]])


def test_factor_errors():
    x, g = randn(3, 5, 7), randn(3, 5, 4)
    for op in (lk.ghost_gram, lk.psg_gram):
        _raises(ValueError, r"x1 must have shape \(N, T, d_in\)", op, randn(3, 7), g)
        _raises(ValueError, r"g1: the token count", op, x, randn(3, 6, 4))
        _raises(ValueError, r"g1: the sample count", op, x, randn(2, 5, 4))
        _raises(ValueError, r"x2: d_in", op, x, g, randn(2, 5, 8), randn(2, 5, 4))
        _raises(ValueError, r"g2: d_out", op, x, g, randn(2, 5, 7), randn(2, 5, 3))
        _raises(ValueError, r"g2: the token count", op, x, g, randn(2, 5, 7), randn(2, 4, 4))
        _raises(ValueError, r"x2 and g2 must be given together", op, x, g, randn(2, 5, 7))
        _raises(ValueError, r"mask1 must have shape \(3, 5\)", op, x, g, mask1=torch.ones(3, 4))
        _raises(ValueError, r"mask2 must have shape \(2, 6\)", op, x, g, randn(2, 6, 7), randn(2, 6, 4),
                mask2=torch.ones(2, 5))
        _raises(ValueError, r"mask2 given without x2", op, x, g, mask2=torch.ones(3, 5))
        _raises(TypeError, r"g1 has dtype torch.float64 but x1 has torch.float32", op, x, g.double())
        _raises(TypeError, r"x1 has dtype torch.int64", op, torch.ones(3, 5, 7, dtype=torch.long), g)
        _raises(ValueError, r"g1 is on meta", op, x, torch.empty(3, 5, 4, device="meta"))
        _raises(ValueError, r"out must have shape \(3, 3\)", op, x, g, out=torch.zeros(3, 2))
    _raises(ValueError, r"kernel must be one of", lk.psg_gram, x, g, kernel="adam")


def test_non_contiguous_inputs_are_accepted():
    """Inputs are copied to contiguous memory when needed (only `out` must be contiguous)."""
    a = randn(8, 10)[:, ::2]
    a64 = a.double()
    torch.testing.assert_close(lk.gram(a, backend="reference"), (a64 @ a64.T).float())
    x, g = randn(5, 3, 4).transpose(0, 1), randn(5, 3, 2).transpose(0, 1)
    ref = lk.ghost_gram(x.contiguous(), g.contiguous(), backend="reference")
    torch.testing.assert_close(lk.ghost_gram(x, g, backend="reference"), ref)
