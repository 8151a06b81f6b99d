"""Compile proof without a GPU: every CUDA source builds for sm_90 and sm_90a with nvcc, the tensor-core
kernels (gram's mma.sync and sm_90a wgmma kernels, ghost_gram, psg_gram's phase 1) compile without register spills, and every Triton kernel compiles
to an sm_90 cubin. Skipped (with the reason) only where the toolchain is absent."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = os.environ.get("NVCC") or shutil.which("nvcc")


def test_cuda_sources_exist():
    names = {os.path.basename(p) for p in CU_SOURCES}
    assert {"gram.cu", "ghost_gram.cu", "psg_gram.cu"} <= names


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("arch", ["90", "90a"])
@pytest.mark.parametrize("src", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(src, arch, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc", "include"),
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", src, "-o", str(tmp_path / "k.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0


PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\w+)'")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_report(text):
    """{mangled kernel name: (registers, stack bytes, spill store bytes, spill load bytes)} from
    `nvcc -Xptxas -v` output."""
    kernels, name = {}, None
    for line in text.splitlines():
        if m := PTXAS_ENTRY.search(line):
            name = m.group(1)
        elif name and (m := PTXAS_SPILL.search(line)):
            kernels[name] = [None, *map(int, m.groups())]
        elif name and (m := PTXAS_REGS.search(line)):
            kernels[name][0] = int(m.group(1))
            name = None
    return {k: tuple(v) for k, v in kernels.items()}


def ptxas_compile(name, arch, tmp_path):
    """ptxas_report of csrc/cuda/<name> compiled for sm_<arch>, and nvcc's output."""
    src = os.path.join(ROOT, "csrc", "cuda", name)
    cmd = [NVCC, "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc", "include"), "-Xptxas", "-v",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", src, "-o", str(tmp_path / "k.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    return ptxas_report(text), text


def assert_mma_kernels_fit(report, kernel, text, instances=2):
    """The bf16 and fp16 instances of `kernel` (`instances` of them) keep accumulators and fragments
    in registers: no spill stores or loads, no stack, and at most 128 registers so that two
    256-thread blocks fit an SM's 64K registers; every other kernel of the file has no spills either."""
    mma = {k: v for k, v in report.items() if kernel in k}
    assert len(mma) == instances and any("bfloat16" in k for k in mma) and any("half" in k for k in mma), text
    for name, (regs, stack, spill_st, spill_ld) in mma.items():
        assert (stack, spill_st, spill_ld) == (0, 0, 0), f"{name}: stack/spills {stack}/{spill_st}/{spill_ld}\n{text}"
        assert regs is not None and regs <= 128, f"{name}: {regs} registers\n{text}"
    for name, (regs, stack, spill_st, spill_ld) in report.items():
        assert spill_st == 0 and spill_ld == 0, f"{name} spills\n{text}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_gram_mma_kernel_does_not_spill(arch, tmp_path):
    """gram_mma_kernel (bf16 and fp16): 64 fp32 accumulators per thread, no spills, <= 128 registers
    (csrc/README.md records the counts)."""
    report, text = ptxas_compile("gram.cu", arch, tmp_path)
    assert_mma_kernels_fit(report, "gram_mma_kernel", text)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
def test_gram_wgmma_kernel_compiles_for_sm90a_without_spills(tmp_path):
    """gram_wgmma_kernel (bf16 and fp16, default and Overlap forms) for sm_90a: ptxas accepts its
    wgmma / fence.proxy.async PTX, and the 64 fp32 accumulators per thread fit in <= 128 registers
    (two 256-thread blocks per SM, as the default form's launch bounds ask) with no stack and no spills."""
    report, text = ptxas_compile("gram.cu", "90a", tmp_path)
    assert_mma_kernels_fit(report, "gram_wgmma_kernel", text, instances=4)
    # ptxas's advisory when it must serialize the MMAs (e.g. accumulators touched while in flight):
    # no other symptom but a large slowdown
    assert "wgmma.mma_async instructions are serialized" not in text, text
    assert any("sm90a_probe_kernel" in k for k in report), text


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_psg_gram_kernels_do_not_spill(arch, tmp_path):
    """psg_gram's phase-1 kernels: psg_f_mma_kernel (bf16 and fp16 inputs, F stored as fp32 or the
    inputs' dtype, plain loads or the cp.async pipeline) within 128 registers, and the 10 instances
    of the CUDA-core psg_f_kernel (4 inputs x 2 outputs with F in out's dtype, and 16-bit F of 16-bit
    inputs) with no stack and no spills (csrc/README.md)."""
    report, text = ptxas_compile("psg_gram.cu", arch, tmp_path)
    assert_mma_kernels_fit(report, "psg_f_mma_kernel", text, instances=8)
    ffma = {k: v for k, v in report.items() if "psg_f_kernel" in k}
    assert len(ffma) == 10, text
    for name, (regs, stack, spill_st, spill_ld) in ffma.items():
        assert (stack, spill_st, spill_ld) == (0, 0, 0), f"{name}: stack/spills {stack}/{spill_st}/{spill_ld}\n{text}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_ghost_gram_mma_kernel_does_not_spill(arch, tmp_path):
    """ghost_gram_mma_kernel (bf16 and fp16): two 32-float accumulator tiles per thread (the
    activation and the gradient product) within 128 registers, no spills; the 8 CUDA-core instances
    spill nothing either."""
    report, text = ptxas_compile("ghost_gram.cu", arch, tmp_path)
    assert_mma_kernels_fit(report, "ghost_gram_mma_kernel", text)
    assert len([k for k in report if "ghost_gram_kernel" in k]) == 8, text


def test_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    # every config of every GPU autotune list (gram, ghost_gram, psg_gram's features kernel) is compiled
    # for each dtype combo of its family, so a config that cannot lower on a GPU fails here
    code = ("from linft_kernels.triton import _compile as c\n"
            "from linft_kernels.triton._autotune import family\n"
            "import json\n"
            "res = c.compile_all(90)\n"
            "print(len(res))\n"
            "assert all(n > 0 for _, _, n, _, _ in res)\n"
            "print('PTXAS ' + json.dumps([[name, label, rep, al] for name, label, _, rep, al in res]))\n"
            "done = {(name, label) for name, label, _, _, al in res if al}\n"
            "for i, it in c._IN.items():\n"
            "    for o, ot in c._OUT.items():\n"
            "        fam = family(*c._compute_config([it], ot, interpret=False)[:2])\n"
            "        for t in c.TUNED:\n"
            "            for cfg in t.gpu_configs[fam]:\n"
            "                want = (t.kernel.__name__, f'{i}->{o} ', c.config_label(cfg))\n"
            "                assert any(n == want[0] and lb.startswith(want[1]) and lb.endswith(want[2])\n"
            "                           for n, lb in done), want\n"
            "print(sorted({r[0] for r in res}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("gram", "ghost", "psg"):
        assert name in proc.stdout, proc.stdout
    reports = reports_of(proc)
    assert any(not al for *_, al in reports), "no unaligned (fallback) variant was compiled"
    # ptxas's report of each variant (Triton's own `ptxas -v`; an empty cache dir, so every variant
    # really runs ptxas). Some autotune candidates spill (128 x 128 tiles with fp32 accumulators, the
    # symmetric form's transposed store; bench/README.md, "Triton register report"), which only makes them
    # lose the autotuning; but every form of every kernel in the usual (aligned) launch must keep at
    # least one candidate that does not spill.
    missing = [(name, label) for name, label, rep, _ in reports if rep is None]
    if len(missing) == len(reports):
        pytest.skip("compiled; this Triton hands out no ptxas log (knobs.nvidia.dump_ptxas_log): spills unchecked")
    assert not missing, f"no ptxas report for {missing} (a Triton cache hit? TRITON_CACHE_DIR is fresh)"
    forms = {}
    for name, label, rep, aligned in reports:
        if aligned:
            form = (name, re.sub(r" BLOCK_\S+ w\d+s\d+$", "", label))
            forms.setdefault(form, []).append(rep["spill_stores"] + rep["spill_loads"])
    assert len(forms) >= 3 * 8, sorted(forms)
    spilling = {form: bytes_ for form, bytes_ in forms.items() if min(bytes_) > 0}
    assert not spilling, "forms whose every candidate spills (bytes per candidate):\n" + "\n".join(
        f"{name} [{form}]: {b}" for (name, form), b in spilling.items())


def reports_of(proc):
    """[(kernel, label, ptxas report, aligned)] printed by the compile_all subprocess."""
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PTXAS "))
    return [tuple(r) for r in json.loads(line[len("PTXAS "):])]
