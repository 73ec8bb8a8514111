"""Builds the optional CUDA extension `fastbert._C` with CMake (pybind11's cmake_example pattern).

Everything else about the package lives in pyproject.toml. The extension is built when nvcc is
found and FASTBERT_BUILD_CUDA is not "0"; otherwise one line says why it was skipped and the
pure-Python package (torch and Triton backends) installs as usual.
FASTBERT_CUDA_ARCHS picks the GPU architectures (CMake syntax, default "80;90a").
"""
import os
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


class CMakeBuild(build_ext):
    def build_extension(self, ext):
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


reason = skip_reason()
if reason is None:
    ext_modules, cmdclass = [CMakeExtension("fastbert._C")], {"build_ext": CMakeBuild}
else:
    # setup.py also runs for metadata queries; say it once, when something is being built
    if BUILD_COMMANDS & set(sys.argv[1:]):
        print(f"fastbert: skipping the CUDA extension fastbert._C ({reason}); the torch and Triton "
              f"backends still install", file=sys.stderr, flush=True)
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
