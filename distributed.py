"""Several processes (torchrun): what each one holds, and the rules that keep them in step.

Under torchrun every process trains on its own batches (train.micro_batches) and they agree on one adapter:
- DDP (the default): every process holds the whole frozen LM and encoder and the adapter; DDP all-reduces the
  adapter's gradients.
- FSDP (`--fsdp`, FSDP2's fully_shard): every process holds 1/world of each frozen weight (its rows of every LM
  layer and encoder block, cut along dim 0, and of the weights outside the blocks) and the whole adapter,
  replicated; the adapter's gradients are averaged here, one all_reduce per step.
Evaluation and feature caching split their batches over the processes in both cases: process r takes batches
r, r + world, ... of the one-process batching, so results are bit-identical to one process's; rank 0 gathers.
Under FSDP a forward is a collective (the weights are gathered layer by layer), so every process must run the
same number of them: a process with one batch fewer runs a stand-in batch (my_batches' None), and one that has
finished generating keeps stepping until all have (all_ranks_done).

Reference: PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) and torchtitan's use of it.
"""
import gc
import os

import torch
import torch.distributed as dist


def setup(device: str, fsdp: bool) -> tuple[int, int, str]:
    """(rank, world size, this process's device); joins torchrun's process group when there is one."""
    if "RANK" not in os.environ:
        if fsdp:  # one process (e.g. to see the mechanics on one GPU): a process group of one
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def finish() -> None:
    if dist.is_initialized():
        gc.collect()  # loader iterators left in reference cycles stop their workers now, not at interpreter exit
        dist.barrier()  # rank 0 may still be scoring and writing: leave together
        dist.destroy_process_group()


# ---- FSDP2: the frozen backbones sharded over the processes ----
def shard_blocks(backbone) -> None:
    """One FSDP unit per LM layer / encoder block, applied on the meta device before any weight is read: each
    process then reads only its own rows of every layer from the checkpoint files (hub.load_weights), so no
    process holds a whole layer stack. Bf16 weights on a GPU need no MixedPrecisionPolicy: they are stored in
    bf16 and frozen, so there is no fp32 master copy and no gradient to reduce."""
    from torch.distributed.fsdp import fully_shard
    for block in backbone.layers:
        fully_shard(block)


def shard_root(model):
    """The root unit: the frozen weights outside the blocks (token and position embeddings, final norms, the
    encoder's stem), loaded whole and sharded here. The adapter (connector + prompt, a few MB) is left out of
    FSDP on purpose: replicated on every process, its gradients averaged by average_adapter_gradients (what DDP
    does), so checkpoints, the optimizer state and exact resume stay plain tensors. Generation and encoding are
    entry points besides forward: registered, so that the root's weights are gathered for them too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    fully_shard(model, ignored_params=set(model.trainable_parameters()))
    for method in ("generate", "encode"):
        register_fsdp_forward_method(model, method)
    return model


def frozen_bytes(model) -> tuple[int, int]:
    """Bytes of the frozen weights this process holds, and of the whole model's frozen weights."""
    mine = whole = 0
    for p in model.parameters():
        if not p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            mine, whole = mine + local.numel() * local.element_size(), whole + p.numel() * p.element_size()
    return mine, whole


def average_adapter_gradients(model) -> None:
    """What DDP does for the adapter under FSDP: every process ends the step with the mean gradient. The
    gradients travel as one flat tensor: one all_reduce per step, not one per trainable tensor."""
    _, world = rank_and_world()
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


# ---- evaluation shared over the processes ----
def my_batches(num_batches: int, fsdp: bool) -> list[int | None]:
    """This process's share of an evaluation's batches: every world-th one from its rank on. Under FSDP the
    processes with one batch fewer end with a stand-in (None), so that all run the same number of forwards."""
    rank, world = rank_and_world()
    mine = list(range(rank, num_batches, world))
    if fsdp:
        mine += [None] * (-(-num_batches // world) - len(mine))
    return mine


def all_ranks_done(done: bool, device) -> bool:
    """Under FSDP a process whose rows have all finished keeps decoding (its outputs ignored) until every
    process has finished, so that all of them run the same forwards."""
    flag = torch.tensor([float(not done)], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def gather_to_master(part: dict) -> dict:
    """Merge every process's dict on rank 0 (the other ranks get {})."""
    rank, world = rank_and_world()
    if world == 1:
        return part
    parts = [None] * world if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    return {k: v for p in parts for k, v in p.items()} if rank == 0 else {}


def max_over_processes(value: int, device) -> int:
    """The largest of every process's value (one tiny all_reduce per call; just the value with one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
