"""Published peak figures of the GPUs the check knows, for rooflines. Dense bf16 tensor-core
FLOP/s and HBM bytes/s from the vendor's datasheets (SXM parts); an unknown device gets no
roofline rather than a guessed one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePeaks:
    name: str
    bf16_flops: float
    hbm_bytes_per_s: float


_PEAKS = (
    DevicePeaks("H200", 989e12, 4.8e12),
    DevicePeaks("H100", 989e12, 3.35e12),
    DevicePeaks("A100", 312e12, 2.0e12),
    DevicePeaks("L40S", 362e12, 0.864e12),
)


def peaks_for(device_name: str) -> DevicePeaks | None:
    """`torch.cuda.get_device_name()` → its peaks ("NVIDIA H200" → H200), None if unknown."""
    upper = device_name.upper()
    return next((p for p in _PEAKS if p.name in upper), None)
