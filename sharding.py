"""
FSDP2 for train.py's --fsdp=True: shard a model over the processes with PyTorch's own fully_shard, and
gather its weights and optimizer state back into the one-file checkpoint a single process writes.
"""
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from cli import UserError


def shard(model, device, dtype):
    """The model under FSDP2 (PyTorch's fully_shard): each block's parameters, then the rest (embedding,
    head, norms; BDH's one shared layer and DAWN's shared pools, which every layer reads), split over
    the processes, so that each holds 1/N of the weights, their gradients and AdamW's moments. A
    block's weights are gathered just before it runs, forward and backward, and freed after. On CUDA
    in bfloat16 they are gathered in bf16 and the gradients reduced in fp32; the sharded master
    weights stay fp32. fully_shard refuses 0-D parameters (DTF's router scalars): those stay whole on
    every process, and the loop averages their gradients itself, as DDP would. Buffers (MoD's and
    DTF's routing thresholds) are never sharded: every process keeps its own, kept equal by the
    models' all-reduced threshold updates."""
    if dtype == "float16":
        raise UserError("--fsdp=True trains in bfloat16 or float32: float16's loss scaling would decide on each "
                        "process's own shard whether to skip a step; use --dtype=bfloat16 (or float32)")
    whole = {p for p in model.parameters() if p.dim() == 0}
    lr_mults = {name: p.lr_mult for name, p in model.named_parameters() if hasattr(p, "lr_mult")}
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" and dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in getattr(model, "blocks", ()):  # BDH has none: its one layer's weights are the model's own
        fully_shard(block, mp_policy=mixed, ignored_params=whole)
    fully_shard(model, mp_policy=mixed, ignored_params=whole)
    for name, p in model.named_parameters():  # sharded parameters are new tensors: configure_optimizer reads lr_mult
        if name in lr_mults:
            p.lr_mult = lr_mults[name]
    return model


def param_names(model, optimizer):
    """The names of the optimizer's parameters in its own numbering: optimizer.state_dict() keys
    them 0, 1, ... through its groups, in order."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def gathered_states(model, optimizer):
    """The whole model and optimizer states of a sharded model, as one process would save them (the
    keyword arguments model_state and optimizer_state of save_checkpoint): every process takes part
    in gathering them, a tensor at a time, into rank 0's CPU memory; the other ranks get {}. PyTorch
    keys the optimizer state by parameter name; it is numbered back, so that the checkpoint is the
    same file whatever the number of processes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return {}
    number = {name: i for i, name in enumerate(param_names(model, optimizer))}
    optimizer_state = {"state": {number[name]: s for name, s in optimizer_state["state"].items()},
                       "param_groups": [{**g, "params": [number[name] for name in g["params"]]}
                                        for g in optimizer_state["param_groups"]]}
    return {"model_state": model_state, "optimizer_state": optimizer_state}


def load_sharded_optimizer(model, optimizer, state):
    """A checkpoint's optimizer state (whole, numbered: written by any number of processes) into the
    optimizer of a sharded model: every process has read the checkpoint and keeps its shard."""
    names = param_names(model, optimizer)
    state = {"state": {names[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
