"""Uploading a processor's uint8 pixels and its normalisation table to the model's device
(the families that normalise beside their vision tower: all of them)."""

from __future__ import annotations

import numpy as np
import torch


def uint8_tensor(array: np.ndarray) -> torch.Tensor:
    """A uint8 array as a CPU tensor, sharing its memory when it is writable. Arrays from PIL
    (`np.asarray(image)`) and from unpickling are read-only, which torch.from_numpy warns
    about: those are copied (a resized image is a few hundred KB)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class DeviceLuts:
    """float32 [3, 256] normalisation tables on one device, cached by content (a processor has
    one table; every request's copy of it is equal), at most 8."""

    def __init__(self) -> None:
        self._luts: dict[tuple[bytes, str], torch.Tensor] = {}

    def get(self, lut: np.ndarray, device: torch.device) -> torch.Tensor:
        lut = np.asarray(lut)
        if lut.dtype != np.float32 or lut.shape != (3, 256):
            raise ValueError(f"lut must be float32 [3, 256], got {lut.dtype} {list(lut.shape)}")
        key = (lut.tobytes(), str(device))
        cached = self._luts.get(key)
        if cached is None:
            if len(self._luts) >= 8:
                self._luts.clear()
            cached = self._luts[key] = torch.from_numpy(lut.copy()).to(device)
        return cached
