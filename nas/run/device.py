"""The device and autocast precision a name asks for, checked against this machine."""

from __future__ import annotations

import torch

from nas.errors import NasError

PRECISIONS = ("auto", "fp32", "bf16")


class DeviceError(NasError):
    """A device or precision that this machine does not have."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but there are {torch.cuda.device_count()} GPUs")
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 convolutions run natively here (CPUs with AVX-512 BF16 or AMX; Ampere+ GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" is bf16 autocast where the hardware runs it natively, else fp32."""
    if name not in PRECISIONS:
        raise DeviceError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if name == "bf16" and not bf16_supported(device):
        raise DeviceError(f"bf16 asked for, but {device} has no native bf16 support")
    return name
