"""The CUDA kernels (csrc/cuda/{gram,ghost_gram,psg_gram}.cu) checked without a GPU: compiled as host
C++ against the emulator in tests/cuda_emu (one host thread per CUDA thread, see its README.md) and
run by its driver, which compares every launcher's output with a float64 reference.

Needs g++ and the CUDA fp16 / bf16 headers (a CUDA toolkit, or the copy bundled with triton); skipped
with the reason where either is missing. Knobs, for checking the test itself or digging deeper:
  LINFT_CUDA_EMU_SRC       directory holding the .cu files and common.cuh to build instead of
                           csrc/cuda (e.g. a deliberately broken copy, to see the test fail)
  LINFT_CUDA_EMU_CXXFLAGS  extra g++ flags, e.g. "-fsanitize=address" or "-fsanitize=thread"
"""
import concurrent.futures
import importlib.util
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMU_DIR = os.path.join(ROOT, "tests", "cuda_emu")
SRC_DIR = os.environ.get("LINFT_CUDA_EMU_SRC") or os.path.join(ROOT, "csrc", "cuda")
KERNELS = ("gram", "ghost_gram", "psg_gram")
GXX = shutil.which("g++")

# Driver op -> the fewest checks it must report (its current count; more is fine, fewer means
# cases were lost).
MIN_CHECKS = {"gram": 207, "ghost_gram": 106, "ghost_gram_t_loop": 1, "psg_gram": 492}
SUMMARY = re.compile(r"^SUMMARY op=(\S+) checks=(\d+) failures=(\d+) launches=(\d+) blocks=(\d+)",
                     re.M)


def _cuda_include():
    """A directory with cuda_fp16.h and cuda_bf16.h (and the runtime headers they pull in)."""
    cands = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH")
             if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    cands.append("/usr/local/cuda/include")
    spec = importlib.util.find_spec("triton")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        cands.append(os.path.join(loc, "backends", "nvidia", "include"))
    for c in cands:
        if all(os.path.isfile(os.path.join(c, h)) for h in ("cuda_fp16.h", "cuda_bf16.h")):
            return c
    return None


@pytest.fixture(scope="module")
def emu_driver(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ not found on PATH: cannot build the CUDA emulator")
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no cuda_fp16.h / cuda_bf16.h found (CUDA_HOME, nvcc, /usr/local/cuda, triton)")
    out = tmp_path_factory.mktemp("cuda_emu")
    flags = ["-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas",
             "-Wno-unused-parameter", "-DLINFT_CUDA_EMULATION", "-include",
             os.path.join(EMU_DIR, "emu.h"), "-I", EMU_DIR, "-I", os.path.join(ROOT, "csrc", "include"),
             "-I", inc] + shlex.split(os.environ.get("LINFT_CUDA_EMU_CXXFLAGS", ""))
    jobs = [["-x", "c++", "-c", os.path.join(SRC_DIR, f"{k}.cu"), "-o", str(out / f"{k}.o")]
            for k in KERNELS]
    jobs += [["-c", os.path.join(EMU_DIR, f"{n}.cpp"), "-o", str(out / f"{n}.o")]
             for n in ("driver", "emu_rt")]

    def compile_one(args):
        return subprocess.run([GXX] + flags + args, capture_output=True, text=True, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as ex:
        procs = list(ex.map(compile_one, jobs))
    for args, p in zip(jobs, procs):
        assert p.returncode == 0, f"g++ failed on {args[-3]}:\n{p.stdout}{p.stderr}"
    exe = out / "driver"
    objs = [a[-1] for a in jobs]
    link = [GXX, "-pthread"] + shlex.split(os.environ.get("LINFT_CUDA_EMU_CXXFLAGS", "")) + objs
    p = subprocess.run(link + ["-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"link failed:\n{p.stdout}{p.stderr}"
    return str(exe)


# ghost_gram_t_loop: one case (blocks that loop over several t tiles) that takes seconds on 2 cores.
@pytest.mark.parametrize("op", [pytest.param(op, marks=pytest.mark.slow) if op.endswith("_t_loop")
                                else op for op in MIN_CHECKS])
def test_cuda_kernel_emulated(emu_driver, op):
    p = subprocess.run([emu_driver, op], capture_output=True, text=True, timeout=600)
    text = p.stdout + p.stderr
    fails = "\n".join(line for line in text.splitlines() if not line.startswith("ok"))
    m = SUMMARY.search(p.stdout)
    assert p.returncode == 0 and m is not None, (
        f"emulated {op} failed (exit {p.returncode}); lines other than 'ok':\n{fails}\n"
        f"--- full output ---\n{text[-20000:]}")
    assert m.group(1) == op
    checks, failures = int(m.group(2)), int(m.group(3))
    assert failures == 0 and "FAIL" not in text, fails
    assert checks >= MIN_CHECKS[op], f"only {checks} checks ran for {op}:\n{text}"
    assert int(m.group(4)) > 0 and int(m.group(5)) > 0, m.group(0)  # kernels were launched


# wgmma mistakes that a GPU does not report (races on shared memory, undefined behaviour) must abort
# the emulated run with a message naming them: one warpgroup, one MMA, one mistake each
# (tests/cuda_emu/driver.cpp, wgmma_misuse_kernel).
@pytest.mark.parametrize("op,message", [
    ("wgmma_no_proxy_fence", r"written by cp\.async with no fence\.proxy\.async by its writer since"),
    ("wgmma_overwrite", r"reads changed between its issue and its wgmma\.wait_group"),
    ("wgmma_descriptors", r"wgmma descriptors differ within warpgroup 0"),
    ("wgmma_unwaited", r"left 1 wgmma operations never waited for"),
    ("wgmma_no_batch_fence", r"wgmma\.mma_async without a wgmma\.fence before its batch"),
    ("wgmma_not_landed", r"reads shared byte \d+, which a cp\.async still in flight will write")])
def test_emulator_names_wgmma_mistakes(emu_driver, op, message):
    p = subprocess.run([emu_driver, op], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and re.search(rf"EMU: .*{message}", p.stderr), \
        f"exit {p.returncode}\n{p.stdout}{p.stderr}"


# A kernel whose barrier some threads never reach (undefined behaviour; a GPU often hangs) must be
# treated as hung: the emulator says which barriers threads wait at and how many, and aborts (once
# every thread has waited, none passing, for LINFT_CUDA_EMU_HANG_S seconds) instead of running into
# the subprocess timeout. Blocks of 64 threads: 40 reach the
# __syncthreads, half of each warp the shuffle, all but one thread (which returned early) the
# __syncthreads; the rest wait at the end of the block.
@pytest.mark.parametrize("op,where", [
    ("hang_sync", r"__syncthreads: 40 of 64 threads waiting; the end of a block: 24 of 64"),
    ("hang_warp", r"the end of a block: 32 of 64 threads waiting; a warp operation of warp 0: 16 of 32 "
                  r"threads waiting; a warp operation of warp 1: 16 of 32"),
    ("hang_exit", r"__syncthreads: 63 of 64 threads waiting; the end of a block: 1 of 64")])
def test_emulator_reports_a_hung_barrier(emu_driver, op, where):
    env = dict(os.environ, LINFT_CUDA_EMU_HANG_S="1")
    p = subprocess.run([emu_driver, op], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and re.search(rf"EMU: hung at {where} threads waiting \(block \(0,0,0\)",
                                           p.stderr), f"exit {p.returncode}\n{p.stdout}{p.stderr}"
