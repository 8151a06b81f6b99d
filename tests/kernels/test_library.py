"""torch.library integration: opcheck on every op and backend, torch.compile without graph breaks."""
import pytest
import torch
from factor_cases import make
from linft_testing import assert_close_to_oracle, cpu_backends, psg_oracle, randn

import linft_kernels as lk


def _cases():
    a, b = randn(5, 37), randn(3, 37)
    x1, g1, m1, x2, g2, m2 = make((4, 3, 5, 6, 17, 9), torch.float32, "cpu", False, True)
    for backend in cpu_backends():
        yield "gram_", (torch.zeros(5, 3), a, b, backend)
        yield "gram_", (torch.zeros(5, 5, dtype=torch.float64), a, None, backend)
        yield "ghost_gram_", (torch.zeros(4, 3), x1, g1, m1, x2, g2, m2, backend, "ghost")
        yield "ghost_gram_", (torch.zeros(4, 4), x1, g1, None, None, None, None, backend, "auto")
        for kernel in ("sgd", "signgd", "asymmetric-signgd"):
            yield "psg_gram_", (torch.zeros(4, 3), x1, g1, m1, x2, g2, m2, kernel, backend, "out")
        yield "psg_gram_", (torch.zeros(4, 4, dtype=torch.float64), x1, g1, m1, None, None, None, "sgd",
                            backend, "float32")


@pytest.mark.parametrize("name,args", list(_cases()))
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.linft, name).default, args)


def test_native_cpu_library_is_built():
    """The CPU library must be part of every install; a missing one is a build failure, not a skip."""
    from linft_kernels import _native
    assert _native.cpu_lib() is not None, _native.load_error("_C_cpu")


@pytest.mark.parametrize("backend", cpu_backends())
def test_compile_fullgraph(backend):
    """All three ops trace into one graph (fullgraph=True fails on any graph break)."""
    torch._dynamo.reset()
    x1, g1, m1, x2, g2, m2 = make((4, 3, 5, 6, 17, 9), torch.float32, "cpu", False, True)

    def f(x1, g1, m1, x2, g2, m2):
        k = lk.ghost_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, backend=backend)
        k = k + lk.psg_gram(x1, g1, x2, g2, kernel="signgd", mask1=m1, mask2=m2, backend=backend)
        feats = x1.flatten(1)
        return k, lk.gram(feats, backend=backend) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    k, g = compiled(x1, g1, m1, x2, g2, m2)
    oracle = psg_oracle(x1, g1, m1, x2, g2, m2) + psg_oracle(x1, g1, m1, x2, g2, m2, kernel="signgd")
    assert_close_to_oracle(k, oracle, torch.float32, extra_atol=1e-3, what="compiled ghost+psg")
    f64 = x1.flatten(1).double()
    assert_close_to_oracle(g, 2 * f64 @ f64.T, torch.float32, what="compiled gram")


def test_compile_inductor_gram():
    """The default inductor backend also accepts the op (out allocated inside the graph)."""
    torch._dynamo.reset()
    a = randn(6, 40)
    compiled = torch.compile(lambda a: lk.gram(a).sum(dim=1) + 1, fullgraph=True)
    a64 = a.double()
    assert_close_to_oracle(compiled(a), (a64 @ a64.T).sum(dim=1) + 1, torch.float32, what="inductor gram")


def test_compile_fullgraph_16bit_tensor_core_shapes():
    """16-bit inputs shaped for tensor cores make the op ask whether they are aligned (for auto's
    CUDA order); while tracing the addresses are unknown, and that must not break the graph."""
    torch._dynamo.reset()
    a = randn(5, 16).bfloat16()
    x, g = randn(3, 4, 8).bfloat16(), randn(3, 4, 16).bfloat16()
    compiled = torch.compile(lambda a, x, g: (lk.gram(a), lk.ghost_gram(x, g)), fullgraph=True,
                             backend="aot_eager")
    k, kg = compiled(a, x, g)
    a64 = a.double()
    assert_close_to_oracle(k, a64 @ a64.T, torch.float32, what="compiled bf16 gram")
    assert_close_to_oracle(kg, psg_oracle(x, g, None, None, None, None), torch.float32,
                           what="compiled bf16 ghost_gram")
