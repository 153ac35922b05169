"""The CUDA libraries CTranslate2 (faster-whisper) needs on a GPU, and where to find them.

CTranslate2 4.x loads cuBLAS 12 and cuDNN 9 when it creates a CUDA model. They come with a
CUDA toolkit, or as the ``nvidia-cublas-cu12`` and ``nvidia-cudnn-cu12`` wheels (``pip
install 'voicebot[gpu]'``). The wheels put the libraries under ``site-packages/nvidia/*/lib``,
which the dynamic loader does not search, so ``preload`` loads them from there by full path
before the first CUDA model is created.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaLibrary:
    """One library CTranslate2 needs, and the wheel that ships it."""

    name: str
    soname: str
    wheel: str
    package: str
    """The wheel's import package; its ``lib/`` holds the shared objects."""


REQUIRED = (
    CudaLibrary("cuBLAS 12", "libcublas.so.12", "nvidia-cublas-cu12", "nvidia.cublas"),
    CudaLibrary("cuBLASLt 12", "libcublasLt.so.12", "nvidia-cublas-cu12", "nvidia.cublas"),
    CudaLibrary("cuDNN 9", "libcudnn.so.9", "nvidia-cudnn-cu12", "nvidia.cudnn"),
)

Loader = Callable[[str], object]
"""Loads a shared library by name or path, raising OSError when it cannot (``ctypes.CDLL``)."""


def _global_load(name: str) -> object:
    return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


def wheel_path(library: CudaLibrary) -> Path | None:
    """The library inside its pip wheel, when that wheel is installed."""
    try:
        spec = importlib.util.find_spec(library.package)
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "lib" / library.soname
        if candidate.is_file():
            return candidate
    return None


def missing(loader: Loader = _global_load) -> list[CudaLibrary]:
    """The required libraries that neither the system loader nor a pip wheel provides."""
    if not sys.platform.startswith("linux"):
        return []  # the names above are Linux's; elsewhere CTranslate2 reports it itself
    absent: list[CudaLibrary] = []
    for library in REQUIRED:
        path = wheel_path(library)
        try:
            loader(str(path) if path is not None else library.soname)
        except OSError:
            absent.append(library)
    return absent


def install_hint(libraries: list[CudaLibrary]) -> str:
    """What to run so that ``libraries`` are found."""
    wheels = " ".join(dict.fromkeys(library.wheel for library in libraries))
    names = ", ".join(f"{library.name} ({library.soname})" for library in libraries)
    return (
        f"{names} not found: pip install 'voicebot[gpu]' (or pip install {wheels}), "
        "or install the CUDA 12 toolkit and cuDNN 9 and put their lib directories on "
        "LD_LIBRARY_PATH"
    )


def preload(loader: Loader = _global_load) -> None:
    """Load the wheels' libraries globally so CTranslate2 finds them; a no-op without them.

    Every library in the wheels' ``lib/`` directories is loaded, since cuDNN 9 opens its
    sub-libraries (ops, cnn, engines…) by name later; passes repeat until no more load, as
    some need another loaded first.
    """
    directories = {path.parent for library in REQUIRED if (path := wheel_path(library))}
    pending = sorted(f for d in directories for f in d.glob("lib*.so*") if f.is_file())
    errors: dict[Path, OSError] = {}
    while pending:
        failed = []
        for path in pending:
            try:
                loader(str(path))
            except OSError as e:
                errors[path] = e
                failed.append(path)
        if len(failed) == len(pending):
            break
        pending = failed
    for path in pending:
        logger.warning("cannot load CUDA library %s: %s", path, errors[path])
