"""
The device a script computes on and in which number format: the --device and --dtype options of
train.py, sample.py, visualize.py and bench.py (pick_device), mixed precision for the chosen dtype
(autocast), and the peak FLOP/s that train.py and bench.py measure MFU against (peak_flops).
"""
from contextlib import nullcontext

import torch

from cli import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name="auto", dtype="auto", local_rank=0):
    """(device, dtype name) for the options --device and --dtype."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device={name}: use auto, cpu, mps, cuda or cuda:N") from None
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device={name}, but this machine has no {device.type} device; use --device=cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if dtype == "auto":
        dtype = "float32" if device.type != "cuda" else \
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, dtype


def autocast(device, dtype):
    """The context to run the model in: float32 as it is, bfloat16 / float16 under torch.autocast
    (matmuls in the low precision, reductions and the loss in float32)."""
    return nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=DTYPES[dtype])


# bf16 dense peak FLOP/s of common GPUs, for MFU (the first name that appears in the device name wins)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "4090": 165e12, "A10G": 70e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
