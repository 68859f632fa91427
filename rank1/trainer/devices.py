"""Which device a learner uses, from what its process can see (the same rule for training and --dry-run).

Under Ray an actor with num_gpus=1 sees only its own GPU: Ray sets CUDA_VISIBLE_DEVICES to the GPU it
assigned (also on a simulated cluster whose nodes merely declare GPUs), so the device index is the
position of that GPU among the visible ones — 0 — and never the learner's position on its node, which
on an 8-GPU node would ask for a device ordinal the process cannot see.
"""

from __future__ import annotations

import os

import torch


def assigned_gpus() -> list[str]:
    """GPU ids Ray gave this process ([] outside Ray or without GPUs)."""
    try:
        import ray

        if ray.is_initialized():
            return [str(g) for g in ray.get_gpu_ids()]
    except Exception:
        pass
    return []


def visible_gpu_indices(visible_devices: str | None = None, assigned: list[str] | None = None) -> list[int]:
    """Indices (as torch numbers them) of the GPUs assigned to this process among those it can see.

    Defaults: this process's CUDA_VISIBLE_DEVICES and the GPU ids Ray assigned it."""
    if visible_devices is None:
        visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    visible = [v.strip() for v in visible_devices.split(",") if v.strip()]
    assigned = assigned_gpus() if assigned is None else assigned
    if assigned and visible:
        return [visible.index(g) for g in assigned if g in visible]
    if assigned:
        return list(range(len(assigned)))
    return list(range(len(visible))) if visible else []


def learner_device(requested: str) -> tuple[str, int]:
    """("cuda:i" or "cpu", the device index to export as LOCAL_RANK) for trainer.device."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return "cpu", 0
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device cuda: this process sees no CUDA device (is the CUDA build of torch installed, "
                           "and does cluster.gpus_per_learner give each learner a GPU?)")
    indices = visible_gpu_indices() or [0]
    return f"cuda:{indices[0]}", indices[0]


def precision_dtype(precision: str, device: str) -> torch.dtype:
    """trainer.precision: auto is bf16 on GPU and fp32 on CPU."""
    bf16 = precision == "bf16" or (precision == "auto" and device.startswith("cuda"))
    return torch.bfloat16 if bf16 else torch.float32


def placement_report(_self=None) -> dict:
    """What this process sees and would use: the dry run's answer from inside each placed actor."""
    import socket

    report = {"host": socket.gethostname(), "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
              "gpu_ids": assigned_gpus(), "gpu_indices": visible_gpu_indices()}
    try:
        import ray

        ctx = ray.get_runtime_context()
        report.update(node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address())
    except Exception:
        pass
    report["device"] = f"cuda:{report['gpu_indices'][0]}" if report["gpu_indices"] else "cpu"
    return report
