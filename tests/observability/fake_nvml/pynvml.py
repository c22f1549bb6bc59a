"""A fake ``pynvml`` (nvidia-ml-py) for tests without a GPU: same function names,
return shapes and errors as the real module, values from ``GPUS`` below.

A directory holding this file goes first on PYTHONPATH of a real ``kvasir serve`` so
its collector reads these GPUs. ``FAKE_NVML_NO_DRIVER=1`` makes ``nvmlInit`` fail as
on a machine without the driver; ``FAKE_NVML_XIDS=79,48`` delivers those XID events
on GPU 0, one per wait.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12


class NVMLError(Exception):
    _msgs = {
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_TIMEOUT: "Timeout",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    }

    def __init__(self, value: int) -> None:
        self.value = value

    def __str__(self) -> str:
        return self._msgs.get(self.value, f"NVML error {self.value}")


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - the real module's name
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_NOT_SUPPORTED)


class NVMLError_Timeout(NVMLError):  # noqa: N801
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_TIMEOUT)


# Two GPUs: an H100-like one with NVLink and ECC, a consumer one without.
GPUS = [
    {
        "uuid": b"GPU-11111111-2222-3333-4444-555555555555",
        "name": b"NVIDIA H100 80GB HBM3",
        "util": (87, 64),
        "mem": (60 * 2**30, 80 * 2**30),
        "temp": 61,
        "temp_mem": 70,
        "power_mw": 512_000,
        "limit_mw": 700_000,
        "clocks": {0: 1755, 1: 1980, 2: 2619},
        "reasons": 0x4 | 0x40,  # sw power cap + hw thermal slowdown
        "nvlink_kib": (1000, 2000),  # tx, rx; grows by this every read
        "ecc": (3, 0),
        "retired": ([0x1000, 0x2000], [0x3000]),
        "pending": 0,
    },
    {
        "uuid": b"GPU-99999999-8888-7777-6666-555555555555",
        "name": b"NVIDIA GeForce RTX 4090",
        "util": (12, 5),
        "mem": (2 * 2**30, 24 * 2**30),
        "temp": 45,
        "temp_mem": None,
        "power_mw": 80_000,
        "limit_mw": 450_000,
        "clocks": {0: 2520, 1: 2520, 2: 10501},
        "reasons": 0x1,
        "nvlink_kib": None,
        "ecc": None,
        "retired": None,
        "pending": None,
    },
]
_state = {"init": 0, "reads": 0, "xids": None}


def _gpu(handle: SimpleNamespace) -> dict:
    return GPUS[handle.index]


def nvmlInit() -> None:  # noqa: N802
    if os.environ.get("FAKE_NVML_NO_DRIVER") == "1":
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    _state["init"] += 1
    if _state["xids"] is None:
        _state["xids"] = [int(x) for x in os.environ.get("FAKE_NVML_XIDS", "").split(",") if x]


def nvmlShutdown() -> None:  # noqa: N802
    _state["init"] -= 1


def nvmlDeviceGetCount() -> int:  # noqa: N802
    return len(GPUS)


_handles: dict[int, SimpleNamespace] = {}


def nvmlDeviceGetHandleByIndex(i: int) -> SimpleNamespace:  # noqa: N802
    return _handles.setdefault(i, SimpleNamespace(index=i))


def nvmlDeviceGetUUID(h: SimpleNamespace) -> bytes:  # noqa: N802
    return _gpu(h)["uuid"]


def nvmlDeviceGetName(h: SimpleNamespace) -> bytes:  # noqa: N802
    return _gpu(h)["name"]


def nvmlDeviceGetUtilizationRates(h: SimpleNamespace) -> SimpleNamespace:  # noqa: N802
    g, m = _gpu(h)["util"]
    return SimpleNamespace(gpu=g, memory=m)


def nvmlDeviceGetMemoryInfo(h: SimpleNamespace) -> SimpleNamespace:  # noqa: N802
    used, total = _gpu(h)["mem"]
    return SimpleNamespace(used=used, total=total, free=total - used)


def nvmlDeviceGetTemperature(h: SimpleNamespace, sensor: int) -> int:  # noqa: N802
    assert sensor == 0
    return _gpu(h)["temp"]


def nvmlDeviceGetPowerUsage(h: SimpleNamespace) -> int:  # noqa: N802
    return _gpu(h)["power_mw"]


def nvmlDeviceGetEnforcedPowerLimit(h: SimpleNamespace) -> int:  # noqa: N802
    return _gpu(h)["limit_mw"]


def nvmlDeviceGetClockInfo(h: SimpleNamespace, clock: int) -> int:  # noqa: N802
    return _gpu(h)["clocks"][clock]


def nvmlDeviceGetCurrentClocksEventReasons(h: SimpleNamespace) -> int:  # noqa: N802
    return _gpu(h)["reasons"]


def _field(fid: int, value: float | None) -> SimpleNamespace:
    if value is None:
        return SimpleNamespace(
            fieldId=fid,
            nvmlReturn=NVML_ERROR_NOT_SUPPORTED,
            valueType=3,
            value=SimpleNamespace(ullVal=0),
        )
    return SimpleNamespace(
        fieldId=fid, nvmlReturn=NVML_SUCCESS, valueType=3, value=SimpleNamespace(ullVal=int(value))
    )


def nvmlDeviceGetFieldValues(h: SimpleNamespace, field_ids: list) -> list:  # noqa: N802
    g = _gpu(h)
    _state["reads"] += 1
    out = []
    for fid in field_ids:
        fid = fid[0] if isinstance(fid, tuple) else fid
        if fid == 82:
            out.append(_field(fid, g["temp_mem"]))
        elif fid in (138, 139):
            nv = g["nvlink_kib"]
            out.append(_field(fid, None if nv is None else nv[fid - 138] * _state["reads"]))
        else:
            out.append(_field(fid, None))
    return out


def nvmlDeviceGetTotalEccErrors(h: SimpleNamespace, error_type: int, counter: int) -> int:  # noqa: N802
    ecc = _gpu(h)["ecc"]
    if ecc is None:
        raise NVMLError_NotSupported()
    assert counter == 0  # volatile
    return ecc[error_type]


def nvmlDeviceGetRetiredPages(h: SimpleNamespace, cause: int) -> list[int]:  # noqa: N802
    r = _gpu(h)["retired"]
    if r is None:
        raise NVMLError_NotSupported()
    return list(r[cause])


def nvmlDeviceGetRetiredPagesPendingStatus(h: SimpleNamespace) -> int:  # noqa: N802
    p = _gpu(h)["pending"]
    if p is None:
        raise NVMLError_NotSupported()
    return p


def nvmlEventSetCreate() -> SimpleNamespace:  # noqa: N802
    return SimpleNamespace(registered=[])


def nvmlDeviceRegisterEvents(h: SimpleNamespace, types: int, event_set: SimpleNamespace) -> None:  # noqa: N802
    if _gpu(h)["ecc"] is None:  # the consumer card: no XID events (as on some boards)
        raise NVMLError_NotSupported()
    event_set.registered.append((h, types))


def nvmlEventSetWait_v2(event_set: SimpleNamespace, timeout_ms: int) -> SimpleNamespace:  # noqa: N802
    xids = _state["xids"] or []
    if xids and event_set.registered:
        return SimpleNamespace(
            device=event_set.registered[0][0], eventType=0x8, eventData=xids.pop(0)
        )
    time.sleep(timeout_ms / 1000.0)
    raise NVMLError_Timeout()


def nvmlEventSetFree(event_set: SimpleNamespace) -> None:  # noqa: N802
    pass
