"""Import the torch-based engine from inside a running napari without crashing the process.

The problem: torch imports triton lazily (``torch._dynamo`` asks ``torch.utils._triton`` whether
triton is installed by importing it; torchvision, which timm imports, pulls in ``torch._dynamo``).
triton's native library ``triton/_C/libtriton*.so`` contains its own LLVM and exports those LLVM
symbols. Once napari has opened its window, the OpenGL driver is loaded; Mesa's driver (llvmpipe
under Xvfb, radeonsi and other Mesa drivers on desktops) brings ``libLLVM-NN.so`` into the
process's *global* symbol scope. When libtriton is loaded after that, the dynamic linker binds
libtriton's calls into LLVM to Mesa's ABI-incompatible copy and its static initialisers crash
the interpreter (SIGSEGV inside ``import triton``). Importing torch before napari opens a window
does not help either: triton is only loaded later, when timm is imported.

The fix: before anything can import triton, load libtriton ourselves with ``RTLD_DEEPBIND``, so
the library resolves the symbols it defines (its LLVM) inside itself, first. Python's later
``import triton`` dlopens the same file, gets the already loaded handle, and works normally; triton
stays fully usable (GPU users keep ``torch.compile``). Nothing else changes: no environment
variables, no import blocking. It is a no-op off Linux, when triton is not installed, or when it
is already loaded (then it was loaded before any GL context and is fine, or it is too late).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["protect_triton_import", "import_segmenter", "triton_library_path"]

_lock = threading.Lock()
_attempted = False
_preloaded_path: Optional[Path] = None


def triton_library_path() -> Optional[Path]:
    """Path of triton's native extension module, found without importing triton."""
    try:
        spec = importlib.util.find_spec("triton")  # locates the package; does not execute it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        # The same suffixes, in the same order, that Python's importer tries for `triton._C.libtriton`.
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(location, "_C", f"libtriton{suffix}")
            if candidate.is_file():
                return candidate
    return None


def protect_triton_import() -> Optional[Path]:
    """Preload libtriton with RTLD_DEEPBIND (once per process); returns the path it preloaded.

    Call before importing torch, timm or the medconddiff engine from inside napari. Thread-safe.
    """
    global _attempted, _preloaded_path
    with _lock:
        if _attempted:
            return _preloaded_path
        _attempted = True
        if not sys.platform.startswith("linux") or not hasattr(os, "RTLD_DEEPBIND"):
            return None
        if "triton" in sys.modules:
            return None
        library = triton_library_path()
        if library is None:
            return None
        try:
            ctypes.CDLL(str(library), mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
        except OSError as error:
            # A broken triton install: torch's own `import triton` would fail (or crash) the same way.
            warnings.warn(f"could not preload {library}: {error}", RuntimeWarning, stacklevel=2)
            return None
        _preloaded_path = library
        return library


def import_segmenter() -> ModuleType:
    """``medconddiff.segmenter`` (which imports torch), imported safely; call off the GUI thread."""
    protect_triton_import()
    from medconddiff import segmenter

    return segmenter
