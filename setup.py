"""Builds the native extension sws_kernels._C with CMake (pybind11's cmake_example pattern).

Metadata lives in pyproject.toml; this file only adds the CMake-built extension. Environment:
  SWS_CUDA=AUTO|ON|OFF      build the CUDA kernels (AUTO: when nvcc is found; default AUTO)
  SWS_CUDA_ARCHS="80;90"    CMAKE_CUDA_ARCHITECTURES (default 80;90)
  CMAKE_BUILD_PARALLEL_LEVEL  parallel build jobs (default: the number of CPUs)
  SWS_CMAKE_ARGS            extra arguments for the CMake configure step (space separated)
  SWS_OPENMP_LIBRARY        OpenMP runtime to link (default: torch's bundled libgomp when torch is installed in
                            the build environment, found without importing torch; "compiler": the compiler's)
Works with `pip install .`, `pip install -e .` and `pip install --no-build-isolation --no-deps -e .`.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir or ROOT).resolve())


def _pybind11_cmake_dir() -> str:
    try:
        import pybind11
    except ImportError as exc:  # pragma: no cover - a build requirement
        raise RuntimeError("building sws_kernels._C needs pybind11>=2.12 (pip install pybind11)") from exc
    return pybind11.get_cmake_dir()


def _torch_openmp() -> str:
    """torch's bundled OpenMP runtime (libgomp*.so* in torch/lib or torch.libs), without importing torch.

    Linking it (not the system libgomp) keeps one OpenMP runtime in the process: torch.set_num_threads then sets
    the kernels' threads too (CMakeLists.txt). Empty when torch is not installed where the build runs."""
    env = os.environ.get("SWS_OPENMP_LIBRARY")
    if env is not None:
        return "" if env.strip().lower() in ("", "compiler", "system") else env
    if not sys.platform.startswith("linux"):
        return ""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.submodule_search_locations:
        return ""
    root = Path(list(spec.submodule_search_locations)[0])
    for d in (root / "lib", root.parent / "torch.libs"):
        libs = sorted(d.glob("libgomp*.so*")) if d.is_dir() else []
        if libs:
            return os.fspath(libs[0])
    return ""


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        # The .so goes where setuptools expects the extension (the package dir for -e installs).
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cfg = "Debug" if os.environ.get("DEBUG", "0") == "1" else "Release"
        sws_cuda = os.environ.get("SWS_CUDA", "AUTO").strip().upper() or "AUTO"
        if sws_cuda not in ("AUTO", "ON", "OFF"):
            raise RuntimeError(f"SWS_CUDA must be AUTO, ON or OFF, got {sws_cuda!r}")
        archs = os.environ.get("SWS_CUDA_ARCHS", "80;90").strip() or "80;90"

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_pybind11_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DSWS_CUDA={sws_cuda}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DSWS_OPENMP_LIBRARY={_torch_openmp()}",
        ]
        cmake_args += shlex.split(os.environ.get("SWS_CMAKE_ARGS", ""))
        if "CMAKE_GENERATOR" not in os.environ:
            try:
                import ninja  # noqa: F401

                cmake_args += ["-GNinja"]
            except ImportError:
                from shutil import which

                if which("ninja"):
                    cmake_args += ["-GNinja"]

        build_args = ["--config", cfg]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += ["--parallel", str(os.cpu_count() or 2)]

        # One build tree per (python, config, cuda setting): switching SWS_CUDA never reuses a stale cache.
        build_temp = Path(self.build_temp) / f"{ext.name}-{cfg}-cuda{sws_cuda}"
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)


setup(
    ext_modules=[CMakeExtension("sws_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
