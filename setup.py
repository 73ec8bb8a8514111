"""Builds the optional CUDA extension `fastbert._C` with CMake (pybind11's cmake_example pattern).

Everything else about the package lives in pyproject.toml. The extension is built when nvcc is
found and FASTBERT_BUILD_CUDA is not "0"; otherwise one line says why it was skipped and the
pure-Python package (torch and Triton backends) installs as usual.
FASTBERT_CUDA_ARCHS picks the GPU architectures (CMake syntax, default "80;90a").

The CPU extension `fastbert._cpu` (csrc/cpu/: fastbert's fp32 CPU attention and add+LayerNorm)
is built with the C++ compiler on x86-64 unless FASTBERT_BUILD_CPU is "0"; if it cannot be built,
one line says why and ATen's kernels serve instead.
"""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def skip_reason():
    if os.environ.get("FASTBERT_BUILD_CUDA", "1") == "0":
        return "FASTBERT_BUILD_CUDA=0"
    if find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def cpu_skip_reason():
    if os.environ.get("FASTBERT_BUILD_CPU", "1") == "0":
        return "FASTBERT_BUILD_CPU=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"its kernels are x86-64 (AVX-512, AVX2) and this is {platform.machine()}"
    return None


class CPUExtension(Extension):
    """fastbert._cpu: pybind11, no torch, GCC vector extensions (the ISA chosen at run time)."""

    def __init__(self):
        import pybind11
        # depends: an edit to a kernel header alone rebuilds the extension
        super().__init__("fastbert._cpu",
                         sources=["csrc/cpu/attention.cpp", "csrc/cpu/layer_norm.cpp"],
                         depends=["csrc/cpu/common.h", "csrc/cpu/hash.h",
                                  "csrc/cpu/attention_kernel.h",
                                  "csrc/cpu/attention_backward.h",
                                  "csrc/cpu/layer_norm_kernel.h"],
                         include_dirs=[str(ROOT), pybind11.get_include()], language="c++",
                         extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
                         extra_link_args=["-fopenmp"])


class CMakeBuild(build_ext):
    def build_extensions(self):
        for ext in list(self.extensions):
            if not isinstance(ext, CPUExtension):
                self.build_extension(ext)
                continue
            try:
                self.build_extension(ext)
            except Exception as e:  # a missing or non-GCC compiler: ATen's kernels serve
                print(f"fastbert: could not build the CPU extension fastbert._cpu ({e}); ATen's "
                      f"CPU kernels serve instead", file=sys.stderr, flush=True)
                self.extensions.remove(ext)  # nothing to copy into the package

    def build_extension(self, ext):
        if isinstance(ext, CPUExtension):
            super().build_extension(ext)
            return
        import pybind11

        # In editable installs setuptools points this into the source tree, next to fastbert/.
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("FASTBERT_CUDA_ARCHS", "80;90a")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        else:
            try:
                import ninja  # the build requirement ships the binary
                args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
            except ImportError:
                pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        print(f"fastbert: building the CUDA extension fastbert._C for archs {archs}", flush=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


ext_modules, cmdclass = [], {"build_ext": CMakeBuild}
cpu_reason = cpu_skip_reason()
if cpu_reason is None:
    ext_modules.append(CPUExtension())
elif BUILD_COMMANDS & set(sys.argv[1:]):
    print(f"fastbert: skipping the CPU extension fastbert._cpu ({cpu_reason})", file=sys.stderr,
          flush=True)
reason = skip_reason()
if reason is None:
    ext_modules.append(CMakeExtension("fastbert._C"))
else:
    # setup.py also runs for metadata queries; say it once, when something is being built
    if BUILD_COMMANDS & set(sys.argv[1:]):
        print(f"fastbert: skipping the CUDA extension fastbert._C ({reason}); the torch and Triton "
              f"backends still install", file=sys.stderr, flush=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
