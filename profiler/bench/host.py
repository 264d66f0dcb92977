"""Facts for meta.yaml: the profiled device, the GPU through NVML, the host, the software, and when.

Nothing here raises: without a GPU, or without NVML, every `gpu:` field says why it is missing, e.g.
`unavailable (NVMLError_LibraryNotFound)`. A CPU profile still reports NVML, so a reader sees whether
a GPU was present.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from profiler.runtime.cuda_api import CUDA

GIB = 1 << 30


def unavailable(reason: BaseException | str) -> str:
    """The value a field gets when it cannot be read."""
    return f"unavailable ({reason if isinstance(reason, str) else type(reason).__name__})"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _read(fn: Callable[[], Any]) -> Any:
    """One NVML query; its failure becomes the field's value instead of an exception."""
    try:
        return _text(fn())
    except Exception as exc:  # noqa: BLE001 - NVMLError subclasses per field (NotSupported, NoPermission...)
        return unavailable(exc)


NVML_FIELDS = ("name", "memory_gib", "driver_version", "cuda_driver_version", "pcie_gen_current",
               "pcie_gen_max", "pcie_width_current", "pcie_width_max", "sm_clock_mhz", "sm_clock_max_mhz",
               "mem_clock_mhz", "mem_clock_max_mhz")


def _nvml_handle(nvml: Any, index: int) -> Any:
    """The NVML handle of torch's CUDA device `index` (by UUID, so CUDA_VISIBLE_DEVICES is respected)."""
    try:
        uuid = str(CUDA.get_device_properties(index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # noqa: BLE001 - older torch or driver: fall back to the index
        return nvml.nvmlDeviceGetHandleByIndex(index)


def gpu_facts(index: int = 0) -> dict[str, Any]:
    """Name, memory, driver, PCIe link (current and max) and clocks of one GPU via NVML."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no library, no driver, no permission: all the same to us
        reason = unavailable(exc)
        return {"nvml": reason, **{key: reason for key in NVML_FIELDS}}
    try:
        return _device_fields(nvml, _nvml_handle(nvml, index))
    except Exception as exc:  # noqa: BLE001 - no such device
        reason = unavailable(exc)
        return {"nvml": reason, **{key: reason for key in NVML_FIELDS}}
    finally:
        _read(nvml.nvmlShutdown)


def _device_fields(nvml: Any, handle: Any) -> dict[str, Any]:
    sm, mem = nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM
    return {
        "nvml": "ok",
        "name": _read(lambda: nvml.nvmlDeviceGetName(handle)),
        "memory_gib": _read(lambda: round(nvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, 2)),
        "driver_version": _read(nvml.nvmlSystemGetDriverVersion),
        "cuda_driver_version": _read(nvml.nvmlSystemGetCudaDriverVersion),
        # An idle link may train down to a lower generation; `max` is what it can do.
        "pcie_gen_current": _read(lambda: nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
        "pcie_gen_max": _read(lambda: nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
        "pcie_width_current": _read(lambda: nvml.nvmlDeviceGetCurrPcieLinkWidth(handle)),
        "pcie_width_max": _read(lambda: nvml.nvmlDeviceGetMaxPcieLinkWidth(handle)),
        "sm_clock_mhz": _read(lambda: nvml.nvmlDeviceGetClockInfo(handle, sm)),
        "sm_clock_max_mhz": _read(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, sm)),
        "mem_clock_mhz": _read(lambda: nvml.nvmlDeviceGetClockInfo(handle, mem)),
        "mem_clock_max_mhz": _read(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, mem)),
    }


def _cpuinfo_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip() in ("model name", "Model", "cpu model"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or unavailable("no model name in /proc/cpuinfo")


def _physical_cores(cpuinfo: str) -> int | str:
    """Distinct (physical id, core id) pairs; absent on some VMs and non-x86 hosts."""
    cores, physical = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return len(cores) or unavailable("no core ids in /proc/cpuinfo")


def _meminfo_gib(meminfo: str) -> float | str:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) * 1024 / GIB, 2)  # the value is in kB
    return unavailable("no MemTotal in /proc/meminfo")


def _read_proc(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def load_average() -> list[float] | str:
    """1, 5 and 15 minute load averages of the host."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError) as exc:
        return unavailable(exc)


def host_facts() -> dict[str, Any]:
    """CPU model, logical and physical cores, memory, OS."""
    cpuinfo, meminfo = _read_proc("/proc/cpuinfo"), _read_proc("/proc/meminfo")
    return {
        "cpu_model": _cpuinfo_model(cpuinfo),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(cpuinfo),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _meminfo_gib(meminfo) if meminfo else unavailable("no /proc/meminfo"),
        "torch_threads": torch.get_num_threads(),
        # Other processes on the box stretch CPU timings; this says how busy it was when collection began.
        "load_avg_1_5_15": load_average(),
        "os": platform.platform(),
    }


def software_facts() -> dict[str, Any]:
    cuda = torch.version.cuda or unavailable("CPU-only torch build")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "torch": str(torch.__version__), "cuda": cuda,
            "cudnn": cudnn if cudnn is not None else unavailable("not available")}


def device_facts(device: torch.device) -> dict[str, Any]:
    """The device the profile measures: a GPU (torch's view of it) or, on CPU, the host CPU."""
    if device.type != "cuda":
        host = host_facts()
        return {"type": "cpu", "name": f"cpu: {host['cpu_model']}", "memory_gib": host["memory_gib"]}
    index = device_index(device)
    props = CUDA.get_device_properties(index)
    return {"type": "cuda", "index": index, "name": props.name, "memory_gib": round(props.total_memory / GIB, 2),
            "sm_count": props.multi_processor_count, "compute_capability": f"{props.major}.{props.minor}"}


def device_index(device: torch.device) -> int:
    """torch's CUDA index of `device` (0 for a CPU profile: NVML then reports the first GPU, if any)."""
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else CUDA.current_device()


def collect_meta(device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """meta.yaml content besides schema_version: facts plus the collection `settings`."""
    return {
        "created_utc": utc_now(),
        "tool": "profiler.collect",
        "device": device_facts(device),
        "gpu": gpu_facts(device_index(device)),
        "host": host_facts(),
        "software": software_facts(),
        **settings,
    }
