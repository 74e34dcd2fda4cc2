"""What identifies the code that computes a fit: a digest of the package's own sources.

The version string alone does not change when a development install's code does, so a
``--resume`` across such a change would mix two codes' numbers in one results file.  The
digest covers every ``.py`` and ``.c`` file of the installed package (path and bytes, in a
fixed order); it is part of a fit's ``input_hash`` and ``input_parts``.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """Hex SHA-256 of the package's ``.py`` and ``.c`` sources (16 digits)."""
    h = hashlib.sha256()
    files = sorted(p for p in _PACKAGE.rglob("*") if p.suffix in (".py", ".c") and p.is_file()
                   and "__pycache__" not in p.parts)
    for path in files:
        h.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
