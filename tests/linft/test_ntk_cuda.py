"""empirical_ntk and ntk_operator on a CUDA model, against the float64 torch.func Jacobian of the same
model on the same GPU. Marked `gpu`: skipped where no GPU is visible.

fp64 models run the whole path in fp64 on the GPU (capture, cuda/triton kernels, fp64 accumulation):
the tolerance is the same 1e-10 as on the CPU. The reference runs on the GPU too: Llama's RMSNorm and
OPT's softmax compute in fp32 even in fp64 models, and GPU and CPU fp32 round differently (seen on an
H200: 4e-7 and 4e-6 relative between a CPU reference and any GPU computation, every strategy alike).
A bf16 Llama + LoRA on the GPU is compared with the fp64 reference of the same (bf16-rounded) weights
on the CPU; bf16 activations limit that one to a few 1e-2.
"""
import copy

import pytest
import torch
from tiny_models import VOCAB, batch, build, kernel_from_jacobian, reference_jacobian, with_lora

import linft

pytestmark = pytest.mark.gpu

PAD = {"gpt2": 0, "llama": 0, "bert": 0, "opt": 1}


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


def _to_cuda(batch_):
    return {k: v.cuda() for k, v in batch_.items()}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize", "generic"])
@pytest.mark.parametrize("arch,lora", [("gpt2", False), ("llama", True), ("opt", True)])
def test_fp64_on_gpu_matches_cpu_jacobian(arch, lora, strategy, backend):
    model = build(arch)
    if lora:
        model = with_lora(model, arch)
    inputs, inputs2 = batch(5, 7, seed=3, pad_id=PAD[arch]), batch(3, 6, seed=4, pad_id=PAD[arch])
    out = linft.outputs.label_word_logits([4, 11])
    params = "trainable" if lora else ["*.c_attn.weight", "*.c_fc.weight", "*.ln_1.weight"]
    gpu_model = copy.deepcopy(model).cuda()
    ntk = linft.empirical_ntk(gpu_model, _to_cuda(inputs), _to_cuda(inputs2), output=out, params=params,
                              strategy=strategy, backend=backend)
    assert ntk.matrix.is_cuda and ntk.matrix.dtype == torch.float64
    names = list(ntk.meta["params"])
    J1 = reference_jacobian(gpu_model, _to_cuda(inputs), out, names)
    J2 = reference_jacobian(gpu_model, _to_cuda(inputs2), out, names)
    K = kernel_from_jacobian(J1, J2, "sgd")
    if arch == "gpt2":  # no fp32 islands: the CPU reference agrees as well
        K_cpu = kernel_from_jacobian(reference_jacobian(model, inputs, out, names),
                                     reference_jacobian(model, inputs2, out, names), "sgd")
        assert _rel(ntk.matrix, K_cpu) < 1e-10
    assert _rel(ntk.matrix, K) < 1e-10


@pytest.mark.parametrize("kernel", ["signgd", "asymmetric-signgd"])
def test_sign_kernels_on_gpu(kernel):
    model = with_lora(build("llama"), "llama")
    inputs = batch(4, 6, seed=5)
    out = linft.outputs.label_word_logits([4, 11])
    gpu_model = copy.deepcopy(model).cuda()
    ntk = linft.empirical_ntk(gpu_model, _to_cuda(inputs), output=out, kernel=kernel)
    J = reference_jacobian(gpu_model, _to_cuda(inputs), out, list(ntk.meta["params"]))
    K = kernel_from_jacobian(J, J, kernel)
    # LoRA gradients here are far from zero, so fp64 signs agree with the reference exactly
    assert _rel(ntk.matrix, K) < 1e-10


@pytest.mark.parametrize("backend", [None, "cuda", "triton"])
def test_bf16_llama_lora_on_gpu(backend):
    """A bf16 model: per-sample gradients built in bf16 (16-bit psg tiles: the native CUDA library's
    tensor-core Gram, the Triton backend's cuBLAS + Triton route) into an fp32 NTK."""
    model = with_lora(build("llama"), "llama")
    gpu_model = copy.deepcopy(model).to(device="cuda", dtype=torch.bfloat16)
    ref_model = copy.deepcopy(gpu_model).to(device="cpu", dtype=torch.float64)  # same rounded weights
    inputs = batch(6, 9, seed=6)
    out = linft.outputs.label_word_logits([4, 11])
    ntk = linft.empirical_ntk(gpu_model, _to_cuda(inputs), output=out, dtype=torch.float32, backend=backend)
    J = reference_jacobian(ref_model, inputs, out, list(ntk.meta["params"]))
    K = J @ J.T
    assert ntk.matrix.dtype == torch.float32
    assert _rel(ntk.matrix, K) < 5e-2  # bf16 activations and gradients (8-bit mantissa)
    # and the diagonal (squared per-sample gradient norms) is positive
    assert (ntk.matrix.diagonal() > 0).all()


def test_operator_on_gpu_matches_explicit():
    model = with_lora(build("gpt2"), "gpt2")
    inputs = _to_cuda(batch(6, 5, seed=7))
    out = linft.outputs.label_word_logits([4, 11])
    gpu_model = copy.deepcopy(model).cuda()
    K = linft.empirical_ntk(gpu_model, inputs, output=out).matrix
    op = linft.ntk_operator(gpu_model, inputs, output=out)
    V = torch.randn(K.shape[0], 3, dtype=torch.float64, device="cuda")
    assert _rel(op @ V, K @ V) < 1e-9


def test_auto_sample_tile_on_gpu():
    """sample_tile=None on a GPU measures one probe capture and picks a power of two within the
    budget; the kernel equals the one from an explicit small tile."""
    model = copy.deepcopy(with_lora(build("llama"), "llama")).cuda()
    inputs = _to_cuda(batch(9, 6, seed=9))
    out = linft.outputs.label_word_logits([4, 11])
    auto = linft.empirical_ntk(model, inputs, output=out)
    tile = auto.meta["sample_tile"]
    assert tile in (1, 2, 4, 8) and any(f"sample_tile={tile} (auto" in n for n in auto.plan["notes"])
    small = linft.empirical_ntk(model, inputs, output=out, sample_tile=2)
    assert _rel(auto.matrix, small.matrix) < 1e-10


def test_non_finite_output_on_gpu_names_the_module_and_samples():
    """On a GPU the tiles' finiteness flags are read from pinned host memory as the GPU finishes them
    (no synchronization per tile): a non-finite tile still stops the pass with the module and samples."""
    model = copy.deepcopy(with_lora(build("llama"), "llama")).cuda()
    inputs = _to_cuda(batch(6, 5, seed=2))
    bad = next(t for t in range(3, VOCAB) if not (inputs["input_ids"] == t).any())  # a token no sample has
    inputs["input_ids"][3, 1] = bad
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight[bad] = float("nan")
    out = linft.outputs.label_word_logits([4, 11])
    with pytest.raises(linft.capture.NonFiniteError, match=r"samples 2\.\.3"):
        linft.empirical_ntk(model, inputs, output=out, sample_tile=2)


def test_label_outputs_do_not_wait_for_the_gpu():
    """The output presets' fixed column indices go to the GPU once: after the first call, computing the
    outputs issues no synchronizing operation (an index list copied from pageable host memory on
    every call made the host wait for the tile's forward before it could queue the backward passes)."""
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 12)

        def forward(self, input_ids):
            return self.emb(input_ids)  # (B, T, V=12): "logits"

    model = LM().cuda()
    ids = torch.randint(0, VOCAB, (3, 5), device="cuda")
    outs = [linft.outputs.label_word_logits([4, 11, 2]), linft.outputs.logits([1, 7])]
    cls_batch = {"input_ids": ids[:, 0]}  # (B,) -> (B, 12) classification "logits"
    firsts = [outs[0](model, {"input_ids": ids}), outs[1](model, cls_batch)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = [outs[0](model, {"input_ids": ids}), outs[1](model, cls_batch)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(firsts, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(again[0], model(ids)[:, -1][:, [4, 11, 2]], rtol=0, atol=0)
    torch.testing.assert_close(again[1], model(ids[:, 0])[:, [1, 7]], rtol=0, atol=0)
