"""Transformers' loading arguments mapped onto ours, or refused with a reason: never silently ignored.

- device_map: one device for the whole model ("cpu", "cuda:0", 0, torch.device, {"": device}, or a dict whose
  modules all go to one device) is `device`; "auto" (also "balanced", "balanced_low_0", "sequential") is the fastest
  device here, a GPU if there is one, else the CPU. A map that splits modules over several devices is refused.
- max_memory ({"cpu": "18GiB", 0: "20GiB"}, with device_map) is checked before any weight is read. With "auto",
  the experts that do not fit stay in offload_folder (mixtral.offload); with a map that names one device, weights
  that do not fit are an error naming both sizes, rather than an OOM kill midway. With device_map="auto" and no
  max_memory, the budget is the memory the device has free.
- offload_folder is accepted with device_map (nothing is offloaded when everything fits).
- load_in_8bit / load_in_4bit / quantization_config (bitsandbytes' form, as a dict or a BitsAndBytesConfig): our
  int8 (per output row) and int4 (asymmetric, per group) weight-only schemes, quantized while loading. bitsandbytes'
  own formats (LLM.int8's outliers, nf4/fp4) are not reproduced: the numbers are ours, the memory about the same.
  Other quantization methods (GPTQ, AWQ, ...) are refused.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from .source import CheckpointError

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "18GiB", "500MB", "2e9" (Transformers' max_memory values)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]?I?B?)\s*", str(size), re.IGNORECASE)
    if m is None or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_memory: {size!r} is not a size (say 18GiB, 500MB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _as_device(where: Any) -> torch.device:
    if isinstance(where, int) and not isinstance(where, bool):
        return torch.device("cuda", where)  # Transformers' GPU indices
    try:
        return torch.device(where)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map: {where!r} is not a device (say 'cpu', 'cuda:0' or a GPU index)") from None


def fastest_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None, device_map: Any) -> torch.device | None:
    """The one device that `device` and `device_map` name together (None: neither names one)."""
    if device_map is None:
        return None if device is None else torch.device(device)
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        mapped = fastest_device()
    elif isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map is an empty dict: give one device (or 'auto') for the whole model")
        devices = {"disk" if d == "disk" else _as_device(d) for d in device_map.values()}
        if len(devices) > 1 or "disk" in devices:
            raise NotImplementedError(
                f"device_map puts modules on {sorted(map(str, devices))}: placing modules on several devices is not "
                "supported; give one device, or 'auto' (with max_memory and offload_folder, the experts that do not "
                "fit stay on disk)")
        mapped = _as_device(next(iter(device_map.values())))
    else:
        mapped = _as_device(device_map)
    if device is not None and torch.device(device) != mapped:
        raise ValueError(f"device={str(device)!r} and device_map={device_map!r} disagree: give one of them")
    return mapped


def device_budget(device: torch.device, max_memory: dict[Any, int | str] | None, device_map: Any) -> int | None:
    """Bytes the weights may take on `device`: max_memory's entry for it; with an "auto" map and no max_memory, what
    the device has free; else None (no check)."""
    if max_memory is not None:
        for key, size in max_memory.items():
            if _as_device(key) == device or device.type == "cuda" and device.index is None and key == 0:
                return parse_size(size)
        raise ValueError(f"max_memory names {sorted(map(str, max_memory))} but the model goes to {device}: "
                         f"add an entry for {'cpu' if device.type == 'cpu' else device.index}")
    if not (isinstance(device_map, str) and device_map in AUTO_MAPS):
        return None
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check_fits(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, budget: int | None) -> None:
    """An error before any weight is read when the meta-device `model`'s weights, as loaded (floats in `dtype`,
    quantized buffers as they are), are more than `budget` bytes."""
    if budget is None:
        return
    need = weight_bytes(model, dtype)
    if need > budget:
        raise CheckpointError(
            f"the weights take {human_size(need)} on {device}, more than the {human_size(budget)} that max_memory "
            "(or the free memory) allows, and a device_map that names one device offloads nothing: use "
            "device_map='auto' with offload_folder=DIR (experts on disk), quantize, or raise max_memory")


def weight_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """The bytes of a (meta) module's weights as loaded: float parameters in `dtype`, buffers (quantized codes and
    their scales) as they are; tied weights once."""
    params = {id(p) for p in module.parameters()}
    tensors = {id(t): t for t in module.state_dict(keep_vars=True).values()}.values()
    return sum(t.numel() * (dtype.itemsize if id(t) in params and t.is_floating_point() else t.element_size())
               for t in tensors)


def human_size(n: int) -> str:
    return next(f"{n / unit:.{digits}f} {name}" for unit, name, digits in
                ((2**30, "GiB", 2), (2**20, "MiB", 1), (2**10, "KiB", 1), (1, "B", 0)) if n >= unit or unit == 1)


def resolve_quantization(quantization: str | dict[str, Any] | None, load_in_8bit: bool, load_in_4bit: bool,
                         quantization_config: Any) -> str | dict[str, Any] | None:
    """Our `quantization=` from Transformers' arguments (see the module's docstring); two that disagree are an
    error."""
    asked: list[tuple[str, str | dict[str, Any]]] = []
    if quantization is not None:
        asked.append(("quantization", quantization))
    if load_in_8bit and load_in_4bit:
        raise ValueError("load_in_8bit and load_in_4bit: give one of them")
    if load_in_8bit or load_in_4bit:
        asked.append(("load_in_8bit" if load_in_8bit else "load_in_4bit", "int8" if load_in_8bit else "int4"))
    if quantization_config is not None:
        asked.append(("quantization_config", _from_quantization_config(quantization_config)))
    if len({str(q) for _, q in asked}) > 1:
        raise ValueError(f"{' and '.join(n for n, _ in asked)} ask for different quantizations: "
                         f"{', '.join(f'{n} -> {q}' for n, q in asked)}")
    return asked[0][1] if asked else None


def _from_quantization_config(config: Any) -> str | dict[str, Any]:
    fields = config if isinstance(config, dict) else config.to_dict() if hasattr(config, "to_dict") else None
    if fields is None:
        raise ValueError(f"quantization_config: expected a dict or a BitsAndBytesConfig, got {type(config).__name__}")
    method = fields.get("quant_method", "bitsandbytes")
    method = str(getattr(method, "value", method)).lower()  # Transformers' QuantizationMethod enum, or a string
    if method == "mixtral":  # ours, as config.json records it
        return {k: fields[k] for k in ("scheme", "group_size", "symmetric") if k in fields}
    if method != "bitsandbytes":
        raise ValueError(f"quantization_config: quant_method {method!r} is not supported; mixtral quantizes to its "
                         "own int8/int4 schemes (load_in_8bit=True, load_in_4bit=True)")
    if fields.get("load_in_8bit") == fields.get("load_in_4bit", False):
        raise ValueError("quantization_config: set exactly one of load_in_8bit and load_in_4bit")
    if fields.get("load_in_4bit"):
        kind = fields.get("bnb_4bit_quant_type", "fp4")
        warnings.warn(f"load_in_4bit: bitsandbytes' {kind} is not reproduced; mixtral's int4 (asymmetric, per group) "
                      "is used, of about the same size", stacklevel=4)
        return "int4"
    return "int8"


def check_needs_map(device_map: Any, **given: Any) -> None:
    """max_memory and offload_folder place a model: without device_map they would do nothing."""
    for name, value in given.items():
        if value is not None and device_map is None:
            raise ValueError(f"{name} needs device_map (say device_map='auto')")


def offload_kwargs(max_memory: str | None, offload_folder: str | None, device: str | None) -> dict[str, Any]:
    """from_pretrained's arguments for the CLI's --max-memory SIZE and --offload-folder DIR: device_map="auto"
    with a budget for the one device (the CPU, or the GPU named), none when neither is given."""
    if max_memory is None and offload_folder is None:
        return {}
    kw: dict[str, Any] = {"device_map": "auto", "offload_folder": offload_folder}
    if max_memory is not None:
        where = torch.device(device) if device is not None else fastest_device()
        kw["max_memory"] = {"cpu" if where.type == "cpu" else where.index or 0: parse_size(max_memory)}
    return kw
