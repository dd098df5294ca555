"""GPU telemetry through NVML (`nvidia-ml-py`, module `pynvml`).

On a host without the NVIDIA driver NVML cannot load; the probe then answers "not available"
with the reason, every time, instead of failing. Each figure is read on its own: one a GPU or
driver does not support reads null rather than hiding the others.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable


class GpuProbe:
    """Reads every GPU's utilisation, memory, PCIe and NVLink throughput, temperature and power."""

    def __init__(self, nvml: Any = None, clock: Callable[[], float] = time.monotonic):
        """nvml: the pynvml module, or a stand-in with its functions (tests); None imports it."""
        self._nvml = nvml
        self._clock = clock
        self._lock = threading.Lock()
        self._ready = False
        self._error: str | None = None
        self._nvlink: dict[int, tuple[float, int]] = {}  # gpu index -> (time, cumulative TX KiB)

    def read(self) -> dict[str, Any]:
        """{"available", "reason", "gpus": [...]}; never raises."""
        with self._lock:
            if not self._ready and self._error is None:
                self._init()
            if self._error is not None:
                return {"available": False, "reason": self._error, "gpus": []}
            nvml = self._nvml
            try:
                count = nvml.nvmlDeviceGetCount()
                gpus = [self._gpu(nvml, i) for i in range(count)]
            except Exception as e:  # the driver went away, or a GPU fell off the bus
                return {"available": False, "reason": f"NVML failed reading the GPUs ({e})", "gpus": []}
            return {"available": True, "reason": None, "gpus": gpus}

    def close(self) -> None:
        with self._lock:
            if self._ready:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    pass
                self._ready = False

    def _init(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                self._error = "nvidia-ml-py is not installed: pip install nvidia-ml-py (module pynvml)"
                return
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as e:
            self._error = f"no NVIDIA driver: NVML could not be loaded ({e})"
            return
        self._ready = True

    def _gpu(self, nvml: Any, index: int) -> dict[str, Any]:
        h = nvml.nvmlDeviceGetHandleByIndex(index)

        def read(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception:  # not supported on this GPU or driver
                return None

        name = read(lambda: nvml.nvmlDeviceGetName(h))
        memory = read(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        util = read(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        power_mw = read(lambda: nvml.nvmlDeviceGetPowerUsage(h))
        tx_kb = read(lambda: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_TX_BYTES))
        rx_kb = read(lambda: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_RX_BYTES))
        return {
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else name,
            "utilization_pct": util.gpu if util is not None else None,
            "memory_used_bytes": memory.used if memory is not None else None,
            "memory_total_bytes": memory.total if memory is not None else None,
            "pcie_tx_bytes_s": tx_kb * 1024 if tx_kb is not None else None,  # NVML reports KB/s
            "pcie_rx_bytes_s": rx_kb * 1024 if rx_kb is not None else None,
            "nvlink_tx_bytes_s": self._nvlink_rate(nvml, h, index),
            "temperature_c": read(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
            "power_w": power_mw / 1000 if power_mw is not None else None,
        }

    def _nvlink_rate(self, nvml: Any, h: Any, index: int) -> float | None:
        """NVLink TX bytes/s over all links since the previous read: NVML gives a cumulative KiB
        counter, so the first read (and any GPU without NVLink) gives None."""
        try:
            (value,) = nvml.nvmlDeviceGetFieldValues(h, [nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX])
            if value.nvmlReturn != 0:
                return None
            kib = int(value.value.ullVal)
        except Exception:
            return None
        now = self._clock()
        previous = self._nvlink.get(index)
        self._nvlink[index] = (now, kib)
        if previous is None or now <= previous[0] or kib < previous[1]:
            return None
        return (kib - previous[1]) * 1024 / (now - previous[0])
