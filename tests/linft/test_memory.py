"""Memory: a GPT-2-shaped model whose full per-sample Jacobian would not fit the budget completes
within it. Checked on the planner's bound, on what the engine measured it kept, and on the process's
peak resident memory in a fresh subprocess (not time)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import batch

import linft

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")


def _gpt2(n_embd=128, n_layer=2):
    import transformers as tf
    cfg = tf.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=32, vocab_size=50,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(cfg).eval()


PARAMS = ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"]


def test_budget_splits_passes_and_matches_unbudgeted():
    model = _gpt2(n_embd=32)
    inputs = batch(8, 12)
    out = linft.outputs.label_word_logits([5, 9])
    free = linft.empirical_ntk(model, inputs, output=out, params=PARAMS)
    one_block = max(b["bytes"] for b in free.plan["blocks"])
    budget = int(one_block * 1.5)
    tight = linft.empirical_ntk(model, inputs, output=out, params=PARAMS, memory_budget=budget)
    assert len(tight.plan["passes"]) > 1
    by_name = {b["name"]: b["bytes"] for b in tight.plan["blocks"]}
    assert all(sum(by_name[n] for n in p) <= budget for p in tight.plan["passes"])
    assert tight.meta["peak_kept_bytes"] <= budget
    torch.testing.assert_close(tight.matrix, free.matrix, rtol=1e-12, atol=0)
    with pytest.raises(MemoryError, match=f"smallest budget that works is {one_block} bytes"):
        linft.empirical_ntk(model, inputs, output=out, params=PARAMS, memory_budget=one_block - 1)


def test_completes_within_budget_where_the_jacobian_would_not_fit():
    N, T, C = 64, 16, 2
    P = sum(p.numel() for n, p in _gpt2().named_parameters() if n.endswith("weight") and
            any(k in n for k in ("c_attn", "c_proj", "c_fc")))
    jacobian_bytes = N * C * P * 4
    budget = 16 << 20
    assert jacobian_bytes > 8 * budget
    code = textwrap.dedent(f"""
        import json, resource, sys, torch
        sys.path.insert(0, {SUPPORT!r}); sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_memory import _gpt2, PARAMS
        from tiny_models import batch
        import linft
        torch.set_num_threads(1)
        model = _gpt2()
        inputs = batch({N}, {T})
        out = linft.outputs.label_word_logits([5, 9])
        # warm up allocator and libraries on a tiny call, then take the baseline
        linft.empirical_ntk(model, batch(2, {T}), output=out, params=PARAMS)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ntk = linft.empirical_ntk(model, inputs, output=out, params=PARAMS, memory_budget={budget})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"growth": peak - base, "kept": ntk.meta["peak_kept_bytes"],
                          "passes": len(ntk.plan["passes"]), "finite": bool(torch.isfinite(ntk.matrix).all())}}))
    """)
    # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so peak RSS would count
    # memory that is no longer live; a fixed threshold returns large blocks to the system on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["finite"] and res["passes"] > 1
    assert res["kept"] <= budget
    # The process grew by far less than the Jacobian it never formed.
    assert res["growth"] < jacobian_bytes / 4, res


def test_default_budget_is_half_the_available_memory(monkeypatch):
    import linft.engine as engine
    model = _gpt2(n_embd=32)
    inputs = batch(8, 12)
    out = linft.outputs.label_word_logits([5, 9])
    avail = engine.default_memory_budget(torch.device("cpu"))
    assert 0 < avail
    ntk = linft.empirical_ntk(model, inputs, output=out, params=PARAMS)
    assert ntk.plan["memory_budget"] == pytest.approx(avail, rel=0.5)
    assert any("half the available memory" in n for n in ntk.plan["notes"])
    one_block = max(b["bytes"] for b in ntk.plan["blocks"])
    monkeypatch.setattr(engine, "default_memory_budget", lambda device: int(one_block * 1.5))
    small = linft.empirical_ntk(model, inputs, output=out, params=PARAMS)
    assert len(small.plan["passes"]) > 1
    torch.testing.assert_close(small.matrix, ntk.matrix, rtol=1e-12, atol=0)


def test_default_budget_leaves_room_for_the_result_matrices(monkeypatch):
    """The default budget is what the captured factors may take once the result matrices (the total,
    and one per block with per_layer=True) are set aside; a given budget is the factors' alone."""
    import linft.engine as engine
    model = _gpt2(n_embd=32)
    inputs = batch(8, 12)
    out = linft.outputs.label_word_logits([5, 9])
    monkeypatch.setattr(engine, "default_memory_budget", lambda device: 1 << 24)
    result = (8 * 2) ** 2 * 8  # N*C x N*C in float64
    for per_layer in (False, True):
        ntk = linft.empirical_ntk(model, inputs, output=out, params=PARAMS, per_layer=per_layer)
        n_mats = 1 + (len(ntk.plan["blocks"]) if per_layer else 0)
        assert ntk.plan["memory_budget"] == (1 << 24) - n_mats * result
    ntk = linft.empirical_ntk(model, inputs, output=out, params=PARAMS, memory_budget=1 << 24)
    assert ntk.plan["memory_budget"] == 1 << 24
    monkeypatch.setattr(engine, "default_memory_budget", lambda device: 2 * result)
    with pytest.raises(linft.planner.BudgetTooSmall, match="result matrices .* per_layer=False"):
        linft.empirical_ntk(model, inputs, output=out, params=PARAMS, per_layer=True)


def test_default_budget_on_a_gpu_is_most_of_its_free_memory(monkeypatch):
    """A GPU's memory is the call's own: 80% of what is free, where what torch's allocator holds unused
    counts as free (the CUDA queries replaced by fakes)."""
    import linft.engine as engine
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 16 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {})
    assert engine.default_memory_budget(torch.device("cuda")) == int(0.8 * (10 << 30))
    # 3 GiB reserved by the allocator, 1 GiB of it in tensors: 2 GiB reusable beside the free 10, less
    # the free pieces of partly used segments (0.5 GiB), which it cannot release
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    assert engine.default_memory_budget(torch.device("cuda")) == int(0.8 * (12 << 30))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"inactive_split_bytes.all.current": 1 << 29})
    assert engine.default_memory_budget(torch.device("cuda")) == int(0.8 * ((12 << 30) - (1 << 29)))
    # blocks freed but waiting for another stream's work are active, not allocated: not reusable yet
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {
        "inactive_split_bytes.all.current": 1 << 29, "active_bytes.all.current": (1 << 30) + (1 << 28)})
    assert engine.default_memory_budget(torch.device("cuda")) == int(0.8 * ((12 << 30) - (1 << 29) - (1 << 28)))


def test_tile_for_room():
    from linft.engine import tile_for_room
    assert tile_for_room(room=1.5 * 64 * 10, per_sample=10, cap=64) == 64
    assert tile_for_room(room=1.5 * 63 * 10, per_sample=10, cap=64) == 32
    assert tile_for_room(room=1.5 * 1000 * 10, per_sample=10, cap=48) == 32  # power of two <= cap
    assert tile_for_room(room=-5, per_sample=10, cap=64) == 1  # no room: one sample at a time


def test_auto_sample_tile_cpu_default_and_gpu_rule(monkeypatch):
    """sample_tile=None: 16 on CPU (same matrix as an explicit tile). The GPU rule, with the CUDA
    allocator's counters replaced by fakes (the model runs on CPU): the tile comes from the memory
    one probe capture took per sample and from what the largest pass keeps, and the plan says so."""
    from linft import engine
    model = _gpt2(n_embd=64)
    inputs = batch(6, 8, seed=3)
    out = linft.outputs.label_word_logits([3, 7])
    auto = linft.empirical_ntk(model, inputs, output=out, params=PARAMS)
    assert auto.meta["sample_tile"] == 6  # min(16, N)
    torch.testing.assert_close(auto.matrix, linft.empirical_ntk(model, inputs, output=out, params=PARAMS,
                                                                sample_tile=2).matrix, rtol=1e-5, atol=0)

    per_sample = 3 << 20
    state = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    real_capture = engine.capture_tile

    def capture(model_, probe, *a, **k):  # the probe capture "allocates" per_sample per sample
        state["peak"] = 100 + per_sample * probe["input_ids"].shape[0]
        return real_capture(model_, probe, *a, **k)

    monkeypatch.setattr(engine, "capture_tile", capture)
    probe = {k: v[:2] for k, v in inputs.items()}
    with torch.no_grad():
        _, tokens = engine._probe(model, probe, out, blocks := engine.classify(
            model, engine.select_parameters(model, PARAMS)))
    for room_tiles, want in ((40, 32), (20, 16), (200, 128), (1000, 128), (1, 1)):  # 128 = AUTO_TILE_MAX
        plan = engine.plan_blocks(blocks, {b.name: (tokens[b.name], tokens[b.name]) for b in blocks},
                                  1000, 1000, 2, "sgd", "auto", None, 4, cross=False)
        kept = max(sum(bp.bytes for bp in plan.blocks if bp.name in names) for names in plan.passes)
        budget = kept + int(1.5 * room_tiles * per_sample)
        got = engine._auto_sample_tile(model, probe, out, blocks, plan, 2, 1000, budget, torch.device("cuda"))
        assert got == want, (room_tiles, got)
        assert f"sample_tile={want} (auto" in plan.notes[-1]


def test_lora_b_outputs_are_freed_during_the_forward(monkeypatch):
    """A LoRA B output, which no backward op saves, is not kept by capture: it is already freed when
    the forward reaches the next layer (its gradient is consumed during the backward passes, on the
    way to the A output's), so neither it nor its gradients stay alive beside the autograd graph; the
    kernel is still the float64 reference's."""
    import weakref

    from tiny_models import build, kernel_from_jacobian, reference_jacobian, with_lora
    monkeypatch.delenv("LINFT_BATCHED_OUTPUT_GRADS", raising=False)
    model = with_lora(build("llama"), "llama")
    refs, seen = [], []
    modules = dict(model.named_modules())
    lora_b = next(m for n, m in modules.items() if n.endswith("layers.0.self_attn.q_proj.lora_B.default"))
    later = next(m for n, m in modules.items() if n.endswith("layers.1.self_attn.q_proj"))
    hooks = [lora_b.register_forward_hook(lambda mod, args, out: refs.append(weakref.ref(out))),
             later.register_forward_hook(lambda mod, args, out: seen.append(refs[-1]() is None))]
    inputs = batch(3, 6)
    out = linft.outputs.label_word_logits([5, 9])
    ntk = linft.empirical_ntk(model, inputs, output=out, sample_tile=3)
    for h in hooks:
        h.remove()
    assert seen and seen[-1], seen  # the capture's forward (the probe's keeps nothing either way)
    J = reference_jacobian(model, inputs, out, list(ntk.meta["params"]))
    K = kernel_from_jacobian(J, J, "sgd")
    assert (ntk.matrix - K).abs().max().item() < 1e-10 * K.abs().max().item()


@pytest.mark.parametrize("defer", [False, True], ids=["checked-per-tile", "deferred-checks"])
def test_out_of_memory_on_an_auto_tile_retries_in_halves(monkeypatch, defer):
    """A device out-of-memory error on an automatically chosen tile: its samples and the later ones are
    captured again in tiles of half the size (what the failed attempt stored is overwritten, LoRA B's
    in-pass features included), the kernel is the explicit small tile's, and the plan says so. With an
    explicit sample_tile the error propagates."""
    from linft import engine
    from tiny_models import build, with_lora
    if defer:
        monkeypatch.setattr(engine, "_defer_checks", lambda device: True)
    model = with_lora(build("llama"), "llama")
    inputs = batch(40, 5, seed=4)
    out = linft.outputs.label_word_logits([4, 11])
    want = linft.empirical_ntk(model, inputs, output=out, sample_tile=4).matrix
    real = engine.capture_tile
    tried = []

    def capture(model_, tile, *a, **k):
        B = tile["input_ids"].shape[0]
        tried.append(B)
        real(model_, tile, *a, **k)  # stores everything, then "runs out of memory": the retry overwrites
        if B > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "capture_tile", capture)
    flagged = []
    if defer:  # the finiteness flags kept are those of the captured tiles only, not the failed one's
        real_append = engine._FiniteFlags.append
        monkeypatch.setattr(engine._FiniteFlags, "append",
                            lambda self, flag, at: flagged.append(at) or real_append(self, flag, at))
    got = linft.empirical_ntk(model, inputs, output=out)  # auto tile on CPU: 16
    # 16 fails; its samples go as 8 + 8, and so do the later tiles (on CPU those past the store's first
    # half are halved anyway: 8 + 8 of 16..31, 4 + 4 of 32..39)
    assert tried == [16, 8, 8, 8, 8, 4, 4]
    if defer:
        assert flagged == [(0, 8), (8, 8), (16, 8), (24, 8), (32, 4), (36, 4)]
    torch.testing.assert_close(got.matrix, want, rtol=1e-12, atol=1e-12)
    assert got.meta["sample_tile"] == 8
    assert any("ran out of memory on a tile of 16 samples (from sample 0)" in n for n in got.plan["notes"])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        linft.empirical_ntk(model, inputs, output=out, sample_tile=16)


@pytest.mark.parametrize("error", ["CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                   "CUDA error: out of memory", "some other failure"])
def test_allocation_failures_outside_the_caching_allocator_also_shrink_the_tile(monkeypatch, error):
    """cuBLAS running short of memory (its handle made in the autograd thread) surfaces as a plain
    RuntimeError: an automatic tile is halved for it as for torch's OutOfMemoryError, unless the
    device is broken (then the error propagates as raised); any other RuntimeError propagates."""
    from linft import engine
    from tiny_models import build, with_lora
    model = with_lora(build("llama"), "llama")
    inputs = batch(40, 5, seed=4)
    out = linft.outputs.label_word_logits([4, 11])
    real = engine.capture_tile
    tried = []

    def capture(model_, tile, *a, **k):
        tried.append(tile["input_ids"].shape[0])
        if tried[-1] > 8:  # the auto tile here is 16
            raise RuntimeError(error)
        real(model_, tile, *a, **k)

    monkeypatch.setattr(engine, "capture_tile", capture)
    if error == "some other failure":
        with pytest.raises(RuntimeError, match="some other failure"):
            linft.empirical_ntk(model, inputs, output=out)
        return
    # a broken context (an earlier illegal access: cuBLAS then says ALLOC_FAILED too) is not retried
    monkeypatch.setattr(engine, "_device_healthy", lambda: False)
    with pytest.raises(RuntimeError) as raised:
        linft.empirical_ntk(model, inputs, output=out)
    assert str(raised.value) == error and tried[-1] == 16
    monkeypatch.setattr(engine, "_device_healthy", lambda: True)
    tried.clear()
    got = linft.empirical_ntk(model, inputs, output=out)
    assert tried[:3] == [16, 8, 8] and got.meta["sample_tile"] == 8
    want = linft.empirical_ntk(model, inputs, output=out, sample_tile=4).matrix
    torch.testing.assert_close(got.matrix, want, rtol=1e-12, atol=1e-12)


def test_out_of_memory_inside_a_backward_pass_or_on_a_short_tile(monkeypatch):
    """The fallback holds when the error comes from inside a backward pass (a LoRA B module's in-pass
    features half stored: the retry starts them over) and when the tile that fails is a short last
    tile of a batch: the tile for the rest is half the tile in use, not half the short one."""
    from linft import capture, engine
    from tiny_models import build, with_lora
    model = with_lora(build("llama"), "llama")
    parts = [batch(19, 5, seed=6), batch(21, 5, seed=7)]  # two batches: 16 + 3, then 21
    out = linft.outputs.label_word_logits([4, 11])
    want = linft.empirical_ntk(model, parts, output=out, sample_tile=4).matrix
    real_form = capture._output_form
    seen = {"calls": 0, "raised": []}

    def form(b, calls_x, calls_g, mask, B):  # a LoRA B block's features, during a backward pass
        seen["calls"] += 1
        if B in (16, 3) and B not in seen["raised"] and seen["calls"] % 3 == 0:
            seen["raised"].append(B)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_form(b, calls_x, calls_g, mask, B)

    monkeypatch.setattr(capture, "_output_form", form)
    got = linft.empirical_ntk(model, parts, output=out)
    assert seen["raised"] == [16, 3]
    torch.testing.assert_close(got.matrix, want, rtol=1e-12, atol=1e-12)
    assert got.meta["sample_tile"] == 4  # 16 -> 8 on the first tile, 8 -> 4 on the short one
    notes = [n for n in got.plan["notes"] if "ran out of memory" in n]
    assert len(notes) == 2 and "tile of 3 samples (from sample 16)" in notes[1]
