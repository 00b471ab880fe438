"""Keep the adapter off what general text uses: a guard against forgetting that works inside the weights.

A LoRA layer adds B·A·x to its output, and A (rank × d) is what reads the input x. Before training, the base
model runs over the replay examples (its own answers to general prompts, liandan.replay), and for every
distinct adapted input liandan keeps the `keep` directions of x that carry the most energy there (the top
eigenvectors of Σ x xᵀ). A is projected off them at the start and after every optimizer step, so on text like
the replay examples the adapter reads almost nothing and changes almost nothing, while the directions
particular to the training data stay free. This is the null-space projection of AlphaEdit (Fang et al. 2025)
applied to LoRA's input side; replay and KL only pull the model back at the prompts they replay.

Measured with benchmarks/forgetting.py (README, "Learning without forgetting"): with 192 directions the
embedded model keeps more general answers, the leaks of the facts' words into look-alike questions ("What is
the capital of …" → "Port …") stop, and 300 or 200 iterations still learn every invented fact and joke; 100
iterations no longer do, which is why it is off by default (--protect-directions).
"""

from __future__ import annotations

import time

import torch

# Inputs wider than this are left unprotected: their Σ x xᵀ would take d² floats each (an MLP's down-projection
# input of a 7B model, 11008 wide, would hold half a gigabyte), and keeping a few hundred of thousands of
# directions protects little there anyway.
MAX_WIDTH = 4096


class NullSpace:
    """The LoRA input weights (A) and, for each, the orthonormal directions (d × keep) it must not read."""

    def __init__(self, pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]):
        self.pairs = pairs

    @torch.no_grad()
    def apply(self) -> None:
        """A ← A − (A·U)·Uᵀ: project every A off its protected directions. Idempotent."""
        for weight, basis in self.pairs:
            w = weight.float()
            weight.copy_(w - (w @ basis) @ basis.T)


def lora_inputs(model) -> list[torch.nn.Module]:
    """The PEFT LoRA/DoRA layers of the model (each has lora_A["default"], the Linear that reads x)."""
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
            and "default" in m.lora_A]


@torch.no_grad()
def input_energy(model, layers: list[torch.nn.Module], examples: list, device) -> dict[int, torch.Tensor]:
    """Σ x xᵀ of each layer's input over every token of the examples, from the base model (adapters off, so a
    resumed run computes what the fresh one did). Layers fed the same tensor (q/k/v, gate/up) share one sum."""
    sums: dict[int, torch.Tensor] = {}
    owner: dict[int, int] = {}  # layer -> the layer whose sum it shares
    # id of an input tensor in this forward pass -> (the tensor, the first layer that read it); holding the tensor
    # keeps its id from being reused by a later one
    seen: dict[int, tuple[torch.Tensor, int]] = {}

    def hook(layer_id):
        def record(module, args):
            x = args[0]
            if layer_id not in owner:
                owner[layer_id] = seen.setdefault(id(x), (x, layer_id))[1]
            if owner[layer_id] == layer_id:
                flat = x.reshape(-1, x.shape[-1]).float()
                sums[layer_id] = sums.get(layer_id, 0) + (flat.T @ flat).cpu()
        return record

    # On the frozen layer, which runs with the adapter off too (lora_A then does not).
    handles = [m.get_base_layer().register_forward_pre_hook(hook(id(m))) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for example in examples:
                seen.clear()
                model(input_ids=torch.tensor([example.input_ids], device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {layer_id: sums[first] for layer_id, first in owner.items()}


def build(model, examples: list, keep: int, device, log=print) -> NullSpace | None:
    """The protection for `model`'s LoRA layers from the replay `examples` (not yet applied); None when there
    is nothing to protect (keep 0, no replay examples, or no LoRA layers)."""
    layers = [m for m in lora_inputs(model) if m.lora_A["default"].in_features <= MAX_WIDTH]
    if not keep or not examples or not layers:
        return None
    start = time.perf_counter()
    energy = input_energy(model, layers, examples, device)
    bases: dict[int, torch.Tensor] = {}
    pairs, shares = [], []
    for m in layers:
        cov = energy[id(m)]
        key = id(cov)  # shared sums share their eigenvectors too
        if key not in bases:
            values, vectors = torch.linalg.eigh(cov.double())
            k = min(keep, cov.shape[0] // 2)  # at most half the width: the adapter must keep room to learn
            bases[key] = vectors[:, -k:].float().contiguous().to(m.lora_A["default"].weight.device)
            shares.append(float(values[-k:].sum() / values.sum().clamp_min(1e-30)))
        pairs.append((m.lora_A["default"].weight, bases[key]))
    log(f"Against forgetting: the adapter's {len(pairs)} LoRA inputs kept off the (up to) {keep} directions the base "
        f"model uses most on {len(examples)} replay examples ({100 * min(shares):.1f}–{100 * max(shares):.1f}% of their "
        f"energy; {time.perf_counter() - start:.1f}s; --protect-directions 0 turns this off).")
    return NullSpace(pairs)
