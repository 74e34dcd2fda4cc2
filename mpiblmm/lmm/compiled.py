"""Loading mpiblmm's compiled kernels: C files that pip builds as extension modules and that
the numerical code calls through ctypes (``blocked/_kernel.c``, ``structures/_level_kernel.c``).

A kernel is used only when it was built, is not turned off by its environment variable, and
reports the version of the call its Python side makes: a library built from older sources
(e.g. after ``git pull`` without ``scripts/setup.sh``) is never called; the numpy path serves
instead, and ``mpiblmm env`` says why.
"""

from __future__ import annotations

import ctypes
import importlib
import os


def turned_off(env: str) -> str:
    """The reason given when ``env`` is set to 0."""
    return f"turned off by {env}=0"


def load(module: str, env: str, abi_symbol: str, abi: int) -> tuple[ctypes.CDLL | None, str]:
    """``(library, "")``, or ``(None, why not)``: "turned off by ...", "not built" or
    "built from older sources"."""
    if os.environ.get(env, "1") == "0":
        return None, turned_off(env)
    try:
        built = importlib.import_module(module)
    except ImportError:
        return None, "not built"
    lib = ctypes.CDLL(built.__file__)
    version = getattr(lib, abi_symbol, None)
    if version is None or version() != abi:
        return None, "built from older sources"
    return lib, ""
