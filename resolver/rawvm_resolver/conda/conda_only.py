"""Conda packages that are no Python distribution (the interpreter, compilers, runtimes, system libraries), with
the reason --pypi-only gives when it drops one.

Kept data on its own, apart from the conversion in pypi_only.py that reads it.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from rawvm_resolver.target import Target

# Conda packages that are no Python distribution, by kind: kept data, checked after the name mapping.
_RUNTIME = "C/C++/Fortran runtime"
CONDA_ONLY: tuple[tuple[str, str], ...] = (
    ("python", "the interpreter itself: the VM's venv brings Python {python}"),
    ("python_abi", "conda's marker of the Python ABI: the venv's Python decides it"),
    ("_*", "conda solver metadata package"),
    ("__*", "conda virtual package"),
    ("pip", "the installer: the VM's venv is installed with uv"),
    ("libcxx", _RUNTIME),
    ("libcxxabi", _RUNTIME),
    ("llvm-openmp", _RUNTIME),
    ("libgfortran*", _RUNTIME),
    ("libgcc*", _RUNTIME),
    ("libstdcxx*", _RUNTIME),
    ("libgomp", _RUNTIME),
    ("intel-openmp", _RUNTIME),
    ("clang*", "compiler toolchain"),
    ("gcc*", "compiler toolchain"),
    ("gxx*", "compiler toolchain"),
    ("gfortran*", "compiler toolchain"),
    ("compiler-rt*", "compiler toolchain"),
    ("cctools*", "compiler toolchain"),
    ("ld64*", "compiler toolchain"),
    ("llvm*", "compiler toolchain"),
    ("binutils*", "compiler toolchain"),
    ("*-compiler", "compiler toolchain"),
    ("compilers", "compiler toolchain"),
    ("*_osx-64", "compiler toolchain"),
    ("*_osx-arm64", "compiler toolchain"),
    ("*_linux-64", "compiler toolchain"),
    ("make", "build tool"),
    ("cmake", "build tool"),
    ("pkg-config", "build tool"),
    ("libtool", "build tool"),
    ("m4", "build tool"),
    ("lib*", "C library"),
    ("openssl", "C library"),
    ("ca-certificates", "CA bundle (certifi is the PyPI one)"),
    ("zlib", "C library"),
    ("xz", "C library"),
    ("bzip2", "C library"),
    ("lz4-c", "C library"),
    ("zstd", "C library"),
    ("snappy", "C library"),
    ("brotli", "C library"),
    ("brotli-bin", "C library"),
    ("tk", "C library"),
    ("tcl", "C library"),
    ("readline", "C library"),
    ("ncurses", "C library"),
    ("sqlite", "C library"),
    ("icu", "C library"),
    ("expat", "C library"),
    ("gettext", "C library"),
    ("pcre*", "C library"),
    ("glib", "C library"),
    ("freetype", "C library"),
    ("fontconfig", "C library"),
    ("harfbuzz", "C library"),
    ("cairo", "C library"),
    ("pango", "C library"),
    ("pixman", "C library"),
    ("jpeg", "C library"),
    ("giflib", "C library"),
    ("openjpeg", "C library"),
    ("lcms2", "C library"),
    ("lerc", "C library"),
    ("jbig", "C library"),
    ("krb5", "C library"),
    ("c-ares", "C library"),
    ("yaml", "C library"),
    ("hdf5", "C library"),
    ("tbb", "C library"),
    ("mkl", "math library"),
    ("mkl_fft", "Intel MKL add-on for numpy (PyPI's numpy uses OpenBLAS)"),
    ("mkl_random", "Intel MKL add-on for numpy (PyPI's numpy uses OpenBLAS)"),
    ("mkl-service", "Intel MKL add-on for numpy (PyPI's numpy uses OpenBLAS)"),
    ("mkl*", "math library"),
    ("openblas", "math library"),
    ("blas", "math library metapackage"),
    ("fftw", "C library"),
    ("gmp", "C library"),
    ("mpfr", "C library"),
    ("mpc", "C library"),
    ("isl", "C library"),
    ("qhull", "C library"),
    ("zeromq", "C library"),
    ("abseil-cpp", "C++ library"),
    ("grpc-cpp", "C++ library"),
    ("re2", "C++ library"),
    ("*-cpp", "C++ library"),
    ("boost*", "C++ library"),
    ("eigen", "C++ library"),
    ("qt*", "Qt's C++ libraries (PyPI's PyQt wheels bundle them)"),
    ("xorg-*", "X11 library"),
    ("graphite2", "C library"),
    ("gdk-pixbuf", "C library"),
    ("tzdata", "IANA zone data"),
    ("openjdk", "Java runtime"),
    ("nodejs", "JavaScript runtime"),
    ("perl*", "Perl"),
    ("r-*", "R package"),
    ("bioconductor-*", "R package"),
    ("pandoc", "tool"),
    ("ghostscript", "tool"),
    ("imagemagick", "tool"),
    ("graphviz", "tool (the Python binding is python-graphviz)"),
    ("git", "tool"),
    ("curl", "tool"),
    ("ffmpeg", "tool"),
    ("cudatoolkit", "CUDA toolkit (PyPI's nvidia-* wheels bring CUDA)"),
    ("cuda-*", "CUDA toolkit (PyPI's nvidia-* wheels bring CUDA)"),
    ("cudnn", "CUDA library"),
    ("nccl", "CUDA library"),
    ("magma*", "CUDA library"),
    ("pytorch-cuda", "conda's CUDA selector for pytorch"),
    ("pytorch-mutex", "conda's build selector for pytorch"),
    ("cpuonly", "conda's CPU selector for pytorch"),
    ("mpich", "MPI library"),
    ("openmpi", "MPI library"),
    ("mpi", "MPI metapackage"),
    ("tensorflow-deps", "Apple's conda metapackage for tensorflow-macos"),
)


NOT_A_LIBRARY = ("the interpreter", "the installer", "conda", "Apple's")


def conda_only_note(reason: str) -> str:
    """The report's note for a dropped conda-only package: its reason, and why dropping a library is harmless."""
    bundled = "" if reason.startswith(NOT_A_LIBRARY) else "; PyPI wheels bundle the native code they need"
    return f"conda-only: {reason}{bundled}"


def named_exactly(name: str) -> bool:
    """A conda-only entry named exactly (python, openssl), not by a glob that Python packages can share."""
    return any(pattern == name for pattern, _ in CONDA_ONLY)


def conda_only_reason(name: str, target: Target) -> str | None:
    """Why ``name`` is no Python distribution (the first pattern it matches), or None when it may be one."""
    for pattern, reason in CONDA_ONLY:
        if fnmatchcase(name, pattern):
            return reason.format(python=target.python)
    return None
