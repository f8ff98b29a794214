"""Freeing ikcp control blocks that the `kcp` 0.1.6 binding never frees.

Its `KCP` extension type has no deallocator that calls `ikcp_release`, so every KCP session leaks
its IKCPCB (about 4 KB) plus every segment still queued in it when the session ends: an agent that
runs for months leaks without bound (the fuzzer's 100,000 objects grew to 440 MB). We free the block
ourselves once the transport is done with it. The pointer sits after PyObject_HEAD and Cython's
vtable pointer; it is trusted only if the block it points to starts with the conv we gave it (the
first field of IKCPCB), so a different binding layout makes this a no-op rather than a wild free.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import kcp.extension

log = logging.getLogger(__name__)

_CB_OFFSET = 3 * ctypes.sizeof(ctypes.c_void_p)
try:
    _LIB: Any = ctypes.CDLL(kcp.extension.__file__)
    _LIB.ikcp_release.argtypes = [ctypes.c_void_p]
    _LIB.ikcp_release.restype = None
except (OSError, AttributeError):  # a binding without the symbol: nothing we can free
    _LIB = None

released = 0
"""Blocks freed in this process (for tests and status)."""


def release(k: Any, conv: int) -> bool:
    """Free `k`'s control block; afterwards `k` must never be used (its pointer is cleared, so a use
    crashes at once instead of touching freed memory). Returns whether a block was freed."""
    global released
    if _LIB is None or type(k) is not kcp.extension.KCP:
        return False
    slot = ctypes.c_void_p.from_address(id(k) + _CB_OFFSET)
    if not slot.value or ctypes.c_uint32.from_address(slot.value).value != conv & 0xFFFFFFFF:
        return False
    _LIB.ikcp_release(slot.value)
    slot.value = None
    released += 1
    return True
