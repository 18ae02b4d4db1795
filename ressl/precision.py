"""Mixed precision: which dtype a device's autocast runs in, and the autocast context itself."""

from __future__ import annotations

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--precision``: ``bf16`` always, ``fp32`` never (None), and ``auto`` bf16 where the
    hardware runs it fast (CUDA that supports it; CPUs with AMX or AVX512-BF16), else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        with torch.cuda.device(device):  # the run's GPU; emulated bf16 (V100, T4) is slower than fp32
            try:
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch before 2.4, whose answer never counted emulation
                native = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else None
    fast_cpu = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if device.type == "cpu" and fast_cpu else None


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> torch.autocast:
    """Autocast in ``dtype`` on ``device``'s type, or a disabled one when ``dtype`` is None (fp32); ``cache`` off
    inside a CUDA graph capture, as PyTorch requires."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=cache)
