"""Which execution device to use. og.is_cuda_available() only says how the wheel was built, so probe the hardware."""

from __future__ import annotations

import ctypes
import functools
import sys

from phi3v_ort.errors import Phi3vError

DEVICES = ("auto", "cuda", "cpu")


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """NVIDIA GPUs the driver reports (0 without a driver), asked through the CUDA driver API itself."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:
        return 0
    return count.value


def gpu_details() -> tuple[str | None, list[str]]:
    """The CUDA driver's version ("13.0") and each GPU's name and memory, for `info` (None, [] without a driver)."""
    try:
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return None, []
    version = ctypes.c_int(0)
    try:
        if lib.cuInit(0) != 0 or lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None, []
        names = []
        for index in range(gpu_count()):
            device, name, total = ctypes.c_int(0), ctypes.create_string_buffer(256), ctypes.c_size_t(0)
            if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
                continue
            lib.cuDeviceGetName(name, 256, device)
            lib.cuDeviceTotalMem_v2(ctypes.byref(total), device)
            names.append(f"{name.value.decode(errors='replace')} ({total.value / 2**30:.0f} GiB)")
    except AttributeError:
        return None, []
    return f"{version.value // 1000}.{version.value % 1000 // 10}", names


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is really there, else 'cpu'; 'cuda' without a GPU is an error."""
    requested = (requested or "auto").lower()
    if requested not in DEVICES:
        raise Phi3vError(f"unknown device {requested!r}: use one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    if gpu_count() > 0:
        return "cuda"
    if requested == "cuda":
        raise Phi3vError("--device cuda was asked for, but no NVIDIA GPU was found on this machine "
                         "(use --device cpu or auto)")
    return "cpu"


def preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip packages (the `cuda` extra) when the system has none installed.

    onnxruntime-gpu >= 1.21 ships `preload_dlls()` for this; og then finds the libraries already in the process.
    Harmless where a system CUDA exists or the function is missing.
    """
    try:
        import onnxruntime

        preload = getattr(onnxruntime, "preload_dlls", None)
        if preload is not None:
            preload()
    except Exception:  # noqa: BLE001 - a failed preload only means og looks for a system CUDA, as before
        pass
