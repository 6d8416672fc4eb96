"""Training features that change nothing in the checkpoint's files but are worth saying:
CPU/NVMe offload and ZeRO++ (hpZ's secondary partition, quantized weights / gradients). They
are read from the `ds_config` the files carry (parallel-layouts.md §1: offload and hpZ save the
same files and keys as plain ZeRO)."""

from __future__ import annotations

from zinspect.core.layouts.pickled import get


def features_of(ds_config) -> list[str]:
    """`Checkpoint.features`: "offload" (optimizer or params offloaded), "nvme" (to NVMe),
    "hpz" (zero_hpz_partition_size > 1), "qwz" / "qgz" (ZeRO++ quantized weights/gradients)."""
    zo = get(ds_config, "zero_optimization")
    if not isinstance(zo, dict):
        return []
    devices = [get(zo, key, "device") for key in ("offload_optimizer", "offload_param")]
    devices = [d for d in devices if isinstance(d, str) and d.lower() not in ("", "none")]
    out = []
    if devices:
        out.append("offload")
    if any(d.lower() == "nvme" for d in devices):
        out.append("nvme")
    hpz = zo.get("zero_hpz_partition_size")
    if type(hpz) is int and hpz > 1:
        out.append("hpz")
    if zo.get("zero_quantized_weights") is True:
        out.append("qwz")
    if zo.get("zero_quantized_gradients") is True:
        out.append("qgz")
    return out
