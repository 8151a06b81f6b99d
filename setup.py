"""Build of linft's native libraries (pybind11, raw pointers, no torch headers).

* ``linft_kernels._C_cpu``  from ``csrc/cpu/*.cpp`` with OpenMP, always.
* ``linft_kernels._C_cuda`` from ``csrc/cuda/*.cu`` (nvcc) and ``csrc/cuda/bindings.cpp`` when nvcc is
  found. A missing or failing CUDA toolchain never fails the install: it warns and the CPU library
  still lands; ``python -m linft_kernels`` then says why CUDA is absent.

Environment switches:
  LINFT_SKIP_CUDA_BUILD=1   do not try to build the CUDA library
  LINFT_CUDA_ARCHS="80;90a"   architectures (default: 80 and 90a, plus PTX of compute_90 for newer
                            GPUs; no plain sm_90 cubin, so that an H100/H200 loads the 90a code and
                            gram runs its wgmma kernel)
  LINFT_NATIVE_ARCH=1       compile the CPU library with -march=native (local builds only; not wheels)
  NVCC                      path of nvcc (default: $CUDA_HOME/bin/nvcc or nvcc on PATH)

This file must not import torch: it runs under build isolation where torch may be absent.
"""
import concurrent.futures
import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "linft_kernels", "_build_info.json")
DEFAULT_ARCHS = ["80", "90a"]


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _find_nvcc():
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _cuda_home(nvcc):
    """The CUDA toolkit root: the first candidate holding the runtime headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda", "/opt/cuda"]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")):
            return c
    return None


def _gencode_flags(archs):
    """-gencode for every architecture, plus PTX of the newest one for forward compatibility (its
    plain form: arch-specific 'a' PTX only runs on that very architecture)."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    numbers = [a.rstrip("a") for a in archs if a.rstrip("a").isdigit()]
    if numbers:
        newest = max(numbers, key=int)
        flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc before linking the CUDA library; never fails on CUDA."""

    def build_extensions(self):
        info = {
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cxx": self.compiler.compiler_cxx[0] if hasattr(self.compiler, "compiler_cxx") else "c++",
            "cpu_flags": [],
            "cuda": {"built": False, "reason": None},
        }
        cuda_exts = [e for e in self.extensions if e.name.endswith("_C_cuda")]
        for ext in self.extensions:
            if ext.name.endswith("_C_cpu"):
                if os.environ.get("LINFT_NATIVE_ARCH") == "1":
                    ext.extra_compile_args.append("-march=native")
                info["cpu_flags"] = list(ext.extra_compile_args)
                ext.define_macros.append(("LINFT_CXX_FLAGS", '"%s"' % " ".join(ext.extra_compile_args)))
        for ext in cuda_exts:
            ok, detail = self._prepare_cuda(ext)
            info["cuda"].update(detail)
            if not ok:
                self.extensions.remove(ext)
        self._cuda_failure = None
        super().build_extensions()
        for ext in cuda_exts:
            if ext in self.extensions and self._cuda_failure is None:
                info["cuda"]["built"] = True
            elif self._cuda_failure is not None:
                info["cuda"]["reason"] = self._cuda_failure
        self._write_build_info(info)

    def build_extension(self, ext):
        if not ext.name.endswith("_C_cuda"):
            return super().build_extension(ext)
        try:
            super().build_extension(ext)
        except Exception as e:  # never fail the install on CUDA: the CPU library is what must land
            self._cuda_failure = f"linking the CUDA library failed: {e}"
            self.warn(self._cuda_failure + "; building linft without the CUDA library")

    def _prepare_cuda(self, ext):
        if os.environ.get("LINFT_SKIP_CUDA_BUILD") == "1":
            return False, {"reason": "skipped: LINFT_SKIP_CUDA_BUILD=1"}
        nvcc = _find_nvcc()
        if not nvcc:
            self.warn("nvcc not found: building linft without the CUDA library")
            return False, {"reason": "nvcc not found at build time"}
        version = _nvcc_version(nvcc)
        archs = [a for a in os.environ.get("LINFT_CUDA_ARCHS", ";".join(DEFAULT_ARCHS)).split(";") if a]
        gencode = _gencode_flags(archs)
        cuda_home = _cuda_home(nvcc)
        if cuda_home is None:
            self.warn("CUDA runtime headers not found (set CUDA_HOME): building without the CUDA library")
            return False, {"reason": "CUDA runtime headers not found next to nvcc; set CUDA_HOME", "nvcc": nvcc}
        os.makedirs(self.build_temp, exist_ok=True)
        jobs = []
        for src in _rel("csrc/cuda/*.cu"):
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Icsrc/include",
                   f"-DLINFT_CUDA_ARCHS=\"{';'.join(archs)}\"", *gencode, "-c", src, "-o", obj]
            jobs.append((src, obj, cmd))

        def compile_one(job):
            src, obj, cmd = job
            print(" ".join(cmd), flush=True)
            return src, subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)

        workers = max(1, min(len(jobs), int(os.environ.get("LINFT_BUILD_JOBS", os.cpu_count() or 1))))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(compile_one, jobs))
        for src, proc in results:
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                self.warn(f"nvcc failed on {src}: building linft without the CUDA library")
                return False, {"reason": f"nvcc failed on {src}", "nvcc": nvcc}
        objects = [obj for _, obj, _ in jobs]
        ext.extra_objects = objects
        ext.include_dirs.append(os.path.join(cuda_home, "include"))
        ext.library_dirs.append(os.path.join(cuda_home, "lib64"))
        ext.libraries.append("cudart")
        ext.runtime_library_dirs.append(os.path.join(cuda_home, "lib64"))
        ext.define_macros.append(("LINFT_CUDA_ARCHS", f"\"{';'.join(archs)}\""))
        return True, {"nvcc": nvcc, "nvcc_version": "%d.%d" % version, "archs": archs,
                      "gencode": gencode, "cuda_home": cuda_home}

    def _write_build_info(self, info):
        # Next to the sources (editable installs) and next to the built libraries (wheels).
        targets = {BUILD_INFO}
        if not self.inplace:
            targets.add(os.path.join(self.build_lib, "linft_kernels", "_build_info.json"))
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(info, f, indent=2)


CXX_FLAGS = ["-O3", "-fopenmp"]
ext_modules = [
    Pybind11Extension(
        "linft_kernels._C_cpu",
        _rel("csrc/cpu/*.cpp"),
        include_dirs=["csrc/include"],
        extra_compile_args=list(CXX_FLAGS),
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    ),
    Pybind11Extension(
        "linft_kernels._C_cuda",
        _rel("csrc/cuda/*.cpp"),
        include_dirs=["csrc/include"],
        extra_compile_args=["-O2"],
        cxx_std=17,
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
