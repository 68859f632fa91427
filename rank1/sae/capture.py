"""Read rank-1 adapter activations from inside the LoRA forward, and splice replacements back in.

A PEFT LoRA layer computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`. With r=1, the output of
`lora_A` is the scalar s = A·x per token: the adapter's activation. A forward hook on each `lora_A`
module reads it from the same forward pass that computes the adapted model's outputs (no second pass),
and a hook that *returns* a tensor replaces it, which is how an SAE reconstruction is spliced in.
Dropout is inactive in eval mode, so the hook sees A·x exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rank1.sae.errors import SAEError

PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterSite:
    name: str  # e.g. model.layers.3.mlp.up_proj
    lora_A: torch.nn.Module


def adapter_sites(model, adapter_name: str = "default") -> list[AdapterSite]:
    """Every rank-1 lora_A of `adapter_name`, in module order (layer by layer, q k v o gate up down)."""
    sites = []
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, torch.nn.ModuleDict) or adapter_name not in lora_A:
            continue
        linear = lora_A[adapter_name]
        if linear.weight.shape[0] != 1:
            raise SAEError(f"{name}: adapter '{adapter_name}' has rank {linear.weight.shape[0]}; the SAE tools read rank-1 adapters")
        sites.append(AdapterSite(name.removeprefix(PEFT_PREFIX), linear))
    if not sites:
        raise SAEError(f"the model has no LoRA adapter named '{adapter_name}' (load one with PeftModel.from_pretrained)")
    return sites


def neuron_sites(model, module_name: str = "up_proj") -> list[tuple[str, torch.nn.Module]]:
    """The MLP projections whose first output channels are the neuron baseline (one per layer).

    On a PEFT model this is the LoRA-wrapped layer, so the neurons are those the adapted model computes.
    """
    return [
        (name.removeprefix(PEFT_PREFIX), module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == module_name and not name.endswith("base_layer")
    ]


class ActivationCapture:
    """Context manager: while active, every forward records adapter scalars and baseline neurons.

        with ActivationCapture(model, neurons_per_layer=6) as cap:
            model(input_ids)
        s = cap.adapter_activations()   # (batch, seq, n_adapters)
    """

    def __init__(self, model, adapter_name: str = "default", neurons_per_layer: int = 0):
        self.sites = adapter_sites(model, adapter_name)
        self.neurons = neuron_sites(model) if neurons_per_layer else []
        self.neurons_per_layer = neurons_per_layer
        self._adapter_out: list[torch.Tensor | None] = [None] * len(self.sites)
        self._neuron_out: list[torch.Tensor | None] = [None] * len(self.neurons)
        self._handles = []

    @property
    def adapter_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def neuron_names(self) -> list[str]:
        return [f"{name}[{c}]" for name, _ in self.neurons for c in range(self.neurons_per_layer)]

    def __enter__(self) -> ActivationCapture:
        for i, site in enumerate(self.sites):
            self._handles.append(site.lora_A.register_forward_hook(self._store(self._adapter_out, i, None)))
        for i, (_, module) in enumerate(self.neurons):
            self._handles.append(module.register_forward_hook(self._store(self._neuron_out, i, self.neurons_per_layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _store(slots: list, i: int, channels: int | None):
        def hook(module, inputs, output):
            # Keep a reference only (no copy): the cost of capture is one slice per module.
            slots[i] = output.detach() if channels is None else output.detach()[..., :channels]

        return hook

    def adapter_activations(self) -> torch.Tensor:
        if any(t is None for t in self._adapter_out):
            raise SAEError("no forward pass ran inside ActivationCapture (or an adapter was skipped)")
        return _cat(self._adapter_out)

    def neuron_activations(self) -> torch.Tensor:
        if not self.neurons:
            return torch.empty(0)
        return _cat(self._neuron_out)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-module outputs as fp32; a base spread over several GPUs leaves them on different devices."""
    device = parts[0].device
    return torch.cat([p.to(device, torch.float32) for p in parts], dim=-1)


class SpliceAdapters:
    """Context manager: replace each lora_A output by a given value, e.g. an SAE reconstruction.

    `replacement` has shape (batch, seq, n_adapters) and must match the next forward's input shape.
    """

    def __init__(self, model, replacement: torch.Tensor, adapter_name: str = "default"):
        self.sites = adapter_sites(model, adapter_name)
        if replacement.shape[-1] != len(self.sites):
            raise SAEError(f"replacement has {replacement.shape[-1]} adapter dims, the model has {len(self.sites)} adapters")
        self.replacement = replacement
        self._handles = []

    def __enter__(self) -> SpliceAdapters:
        for i, site in enumerate(self.sites):
            def hook(module, inputs, output, i=i):
                return self.replacement[..., i : i + 1].to(output.dtype)

            self._handles.append(site.lora_A.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
