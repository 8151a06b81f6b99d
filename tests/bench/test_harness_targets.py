"""bench/harness.py --targets: issue 5's targets read off result rows (synthetic rows here), so that a
GPU session's files answer them at once."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _harness():
    spec = importlib.util.spec_from_file_location("linft_bench_harness", ROOT / "bench" / "harness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ops(backend, pct, pipelined=None, name="psg_gram_sym", shape="N=256,T=256,d_in=1024,d_out=1024",
         kernel="sgd", device="cuda", dtype="bfloat16", **extra):
    return dict(suite="ops", device=device, name=name, dtype=dtype, shape_str=shape, kernel=kernel,
                backend=backend, pct_of_peak=pct, pipelined_pct_of_peak=pipelined, git_commit="abcdef0123",
                **extra)


def _line(table, start):
    return next(ln for ln in table.splitlines() if ln.startswith(start))


def test_targets_take_the_best_call_of_the_op_under_either_timer():
    h = _harness()
    rows = [
        _ops("triton", 12.0),
        _ops("triton [bfloat16 tiles]", 41.0, pipelined=61.0),  # met through do_bench's median
        _ops("reference", 90.0),                                  # not linft's kernels
        _ops("cublas chunks [bfloat16 tiles]", 80.0),             # bypasses the op
        _ops("triton [bfloat16 tiles]", 95.0, kernel="signgd"),  # another kernel
        _ops("cuda", 60.0, name="gram_sym", shape="N=4096,P=65536", kernel=None),
        _ops("cpu", None, name="gram_sym_headline", shape="N=4096,P=65536", kernel=None, device="cpu",
             dtype="float32", baseline="torch a@a.T [float32]", ratio=1.55),
        dict(suite="ntk", device="cuda", name="ntk_llama1b_lora_r8", method="linft", git_commit="abc",
             ntk_cost_ratio=1.31, targets={"ntk_cost_ratio<=1.5": True}),
    ]
    table = h.targets_table(rows)
    psg = _line(table, "| H200 psg_gram")
    assert "triton [bfloat16 tiles] (abcdef0)" in psg and "41% (61% pipelined)" in psg and psg.endswith("| yes |")
    gram = _line(table, "| H200 gram")
    assert "| 60% |" in gram and gram.endswith("| no |")
    cpu = _line(table, "| CPU gram")
    assert "1.55x" in cpu and cpu.endswith("| no |")
    assert _line(table, "| cuda ntk_llama1b_lora_r8").endswith("| 1.31x | yes |")


def test_targets_skip_what_the_rows_do_not_measure():
    quick_headline = _ops("cpu", None, name="gram_sym_headline", shape="N=2048,P=16384", kernel=None,
                          device="cpu", dtype="float32", baseline="torch a@a.T [float32]", ratio=1.7)
    table = _harness().targets_table([_ops("triton", 30.0, name="ghost_gram_sym"), quick_headline])
    assert table.splitlines()[2:] == []  # --quick's smaller headline does not answer the target
