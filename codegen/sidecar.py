"""Sidecar tensor files for generated modules: an `.npz` whose bytes depend only on the arrays."""

from __future__ import annotations

import io
import zipfile

import numpy as np


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Zip entries in name order with a fixed timestamp, uncompressed, no pickles."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            data = io.BytesIO()
            np.lib.format.write_array(data, np.asarray(arrays[name], order="C"), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), data.getvalue())
    return buf.getvalue()
