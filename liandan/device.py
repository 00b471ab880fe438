"""Where a model runs: the device, its default dtype, and the peak memory a run used there."""

from __future__ import annotations

from dataclasses import dataclass

# --dtype spellings -> torch dtype names (config.py validates --dtype against these keys).
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DTYPE_HELP = "float32, bfloat16 or float16 (default: bf16 on CUDA cards that support it, else fp32)"  # pick_device


@dataclass
class Device:
    """Where the model runs and in which precision."""

    type: str  # "cpu", "cuda" or "mps"
    dtype: "object"  # a torch.dtype

    @property
    def torch_device(self):
        import torch

        return torch.device(self.type)


def pick_device(dtype: str | None = None) -> Device:
    """CUDA, then MPS, then CPU. fp32 on CPU (bf16 matmuls are ~100x slower on CPUs without AVX-512-BF16),
    bf16 on CUDA cards that support it."""
    import torch

    from liandan.errors import LiandanError

    if torch.cuda.is_available():
        kind = "cuda"
        # Without emulation: older cards (T4, V100) can store bf16 but compute it slowly; fp32 is faster there.
        default = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    elif has_mps():
        kind, default = "mps", torch.float32
    else:
        kind, default = "cpu", torch.float32
    if dtype:
        if dtype not in DTYPES:  # lora's --dtype is checked in config.py; generate/chat/serve pass theirs here
            raise LiandanError(f"--dtype {dtype} is not one of {', '.join(sorted(set(DTYPES.values())))}")
        default = getattr(torch, DTYPES[dtype])
    return Device(kind, default)


def has_mps() -> bool:
    """Whether this is a Mac whose GPU torch can use (Metal Performance Shaders)."""
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def peak_memory_gb(device=None) -> float:
    """Peak memory of this process on `device` (a torch.device, a Device or a name; None: CUDA when present):
    the CUDA allocator's peak on a GPU, the maximum resident set size elsewhere."""
    import torch

    kind = getattr(device, "type", device)
    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if str(kind).startswith("cuda"):
        index = getattr(device, "index", None)
        return torch.cuda.max_memory_allocated(index) / 1e9
    import resource
    import sys

    per_gb = 1e9 if sys.platform == "darwin" else 1e6  # ru_maxrss is in bytes on macOS, in kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_gb


def accelerator_rng_state(device) -> dict:
    """The random state of `device` (a torch.device) when it is a GPU, for a checkpoint: LoRA dropout above 0
    draws from it there, so an exact resume needs it beside the CPU's. Empty on the CPU."""
    import torch

    kind = getattr(device, "type", device)
    if kind == "cuda":
        return {"cuda_rng": torch.cuda.get_rng_state(device)}
    if kind == "mps":
        return {"mps_rng": torch.mps.get_rng_state()}
    return {}


def restore_accelerator_rng(state: dict, device) -> None:
    """Put back what accelerator_rng_state saved, when the run resumes on the same kind of device."""
    import torch

    kind = getattr(device, "type", device)
    if kind == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    elif kind == "mps" and "mps_rng" in state:
        torch.mps.set_rng_state(state["mps_rng"])
