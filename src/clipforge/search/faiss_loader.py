"""``import faiss`` without the noise of its loader (faiss-cpu is a dependency: exact single-query search
scans float16 rows with its SIMD kernels, and ``clipforge index build`` makes its approximate indexes)."""

from __future__ import annotations

import contextlib
import logging
from types import ModuleType

from clipforge.logs import quiet_loggers


def import_faiss() -> ModuleType:
    """The ``faiss`` module; ImportError with the fix when the install lacks it."""
    try:
        with _quiet_faiss_loader():
            import faiss
    except ImportError:
        raise ImportError("FAISS does not import: pip install faiss-cpu (a dependency of clipforge)") from None
    return faiss


def _quiet_faiss_loader() -> contextlib.AbstractContextManager[None]:
    """faiss's loader tries its AVX2/AVX512 builds first and logs each miss at INFO, traceback text and all
    (``ModuleNotFoundError(... swigfaiss_avx2)``), although it then loads the generic build: under the CLI's
    INFO logging that printed on every search. Only its INFO is dropped; its warnings and errors still show."""
    return quiet_loggers(("faiss.loader",), logging.WARNING)
