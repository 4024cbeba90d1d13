"""torchrun for moekd: a DDP or FSDP2-sharded student, a replicated or FSDP2-sharded teacher, collectives and
per-rank memory accounting. In a single process (Dist() = rank 0 of 1) every entry point is a no-op.

Every rank knows the whole global batch (rows are a pure function of seed and step) and works on its own
contiguous share; all randomness is seeded from the position in the global batch, so a run does not depend
on how its global batch is split over devices and accumulation, and resuming needs no RNG state.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from errors import MoekdError


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MoekdError(f"{flag} {name}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoekdError(f"{flag} {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: bf16 autocast on CUDA by default, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def init_distributed(cfg) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (nccl on GPUs, gloo on CPU) and pick this rank's device.
    Without torchrun, a single process on --device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        for flag in ("shard_teacher", "shard_student"):
            if getattr(cfg, flag):
                raise MoekdError(f"--{flag.replace('_', '-')} needs several processes: launch with torchrun "
                                 f"--nproc_per_node N")
        return SINGLE, resolve_device(cfg.device)
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    device = resolve_device(cfg.device)
    if device.index is not None:
        raise MoekdError(f"--device {cfg.device}: under torchrun every rank picks its own device "
                         f"(LOCAL_RANK); pass --device {device.type}")
    name = cfg.teacher_device
    pinned = name is not None and resolve_device(name, "--teacher-device").index is not None
    if pinned or (name is not None and cfg.shard_teacher and name != cfg.device):
        raise MoekdError(f"--teacher-device {name}: under torchrun the teacher lives on each rank's --device"
                         f"{' (sharded over them)' if cfg.shard_teacher else ' or on cpu'}")
    if device.type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() < local_world:
            raise MoekdError(f"torchrun started {local_world} processes on this node, which has "
                             f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node <= "
                             f"{torch.cuda.device_count()}")
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    import datetime
    import torch.distributed as td
    td.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=dist.rank, world_size=world,
                          timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    return dist, device


def split_global_batch(cfg, world: int) -> int:
    """Set cfg.grad_accum from --global-batch-size (if given); returns the global batch.
    The global batch must be batch_size x devices x grad_accum."""
    per_step = cfg.batch_size * world
    if cfg.global_batch_size is not None:
        accum, rest = divmod(cfg.global_batch_size, per_step)
        if rest or accum == 0:
            raise MoekdError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --batch-size "
                             f"{cfg.batch_size} x {world} device(s) = {per_step}")
        if cfg.grad_accum is not None and cfg.grad_accum != accum:
            raise MoekdError(f"--grad-accum {cfg.grad_accum} contradicts --global-batch-size "
                             f"{cfg.global_batch_size} (= {cfg.batch_size} x {world} device(s) x {accum})")
        cfg.grad_accum = accum
    return per_step * cfg.grad_accum


def enable_checkpointing(model: nn.Module, what: str) -> None:
    """Activation checkpointing of every decoder layer, transformers' own.
    Non-reentrant, so it composes with DDP and FSDP2; the recomputation replays the RNG state, so gate
    noise is the same."""
    try:
        model.activation_checkpointing_enable()
    except (ValueError, AttributeError):
        raise MoekdError(f"--grad-checkpointing: {what} ({type(model).__name__}) does not support "
                         f"it") from None


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def comm_device() -> torch.device:
    """Where collectives' tensors must live: the rank's GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum a few numbers over ranks (fp64, so token counts and loss sums stay exact)."""
    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def average_gradients(params: list[nn.Parameter], dist: Dist) -> None:
    """What DDP does to the student, for the replicated teacher's routers.
    Every rank ends with the mean of the ranks' gradients (one flat all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if dist.world == 1 or not grads:
        return
    # a --teacher-device cpu under nccl moves
    flat = torch.cat([g.reshape(-1) for g in grads]).to(comm_device())
    torch.distributed.all_reduce(flat)
    flat /= dist.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def full(t):
    """A DTensor's full tensor (FSDP2 gathers its shards); any other tensor, or None, as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (generation, saving and attribute checks use it)."""
    return getattr(model, "module", model)


def wrap_student(model: nn.Module, dist: Dist, device: torch.device, *, moe: bool) -> nn.Module:
    """DDP over the student (a --shard-student one was sharded as it was loaded).
    An MoE student may leave experts without tokens in a micro-batch, so DDP must look for unused
    parameters; the ranks load identical weights, so buffers need no syncing during training."""
    if dist.world == 1 or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=moe, forward_sync_buffers=False)


def device_mesh(sharded: bool, device: torch.device, dist: Dist):
    """torchrun's 1-D device mesh of the FSDP2-sharded models (None without sharding)."""
    if not sharded:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (dist.world,))


def shard_model(model: nn.Module, mesh, separate: list[nn.Module] = (), *, frozen: bool = False) -> nn.Module:
    """FSDP2 over a causal LM: each decoder layer one sharded unit, embeddings and head the root's.
    Each layer is gathered for its forward and freed after; parameters move to the mesh's device.
    `separate` modules get units of their own: FSDP2 gathers one dtype per unit, and SAR keeps fp32 routers
    in a bf16 teacher. FSDP2 keeps the root gathered between forward and backward; a `frozen` model (the
    teacher) has no backward to wait for, so its root is freed after each forward too."""
    from torch.distributed.fsdp import fully_shard
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise MoekdError(f"sharding: {type(model).__name__} has no model.layers to shard")
    for module in [*separate, *layers]:
        fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if frozen else {}))


def one_rank_at_a_time(dist: Dist, build):
    """build() on each rank in turn, a barrier between turns.
    So a model sharded right after it is read into host memory has one full host copy alive at a time, not
    one per rank."""
    built = None
    for r in range(dist.world):
        if r == dist.rank:
            built = build()
        barrier(dist)
    return built


def shard_loaded(model: nn.Module, mesh, device: torch.device, **options) -> nn.Module:
    """shard_model for a model load_model read onto the CPU, after restoring the GPU experts kernel.
    load_model picks the eager one for the CPU."""
    if device.type != "cpu" and type(model)._can_set_experts_implementation():
        model.set_experts_implementation("grouped_mm")
    return shard_model(model, mesh, **options)


def gradient_sync(model: nn.Module, enabled: bool):
    """Gradient all-reduce on (the last micro-batch of a step) or off (the ones before).
    DDP's no_sync(), FSDP2's set_requires_gradient_sync(); nothing to do in a single process."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    elif not enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a (possibly sharded) model as full CPU tensors on rank 0, empty elsewhere.
    A collective when sharded, so every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """An optimizer's state keyed by parameter name with full tensors.
    So a checkpoint resumes on any number of ranks, sharded or not; a collective for a sharded model, so
    every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local_mb(tensors) -> float:
    """MB this rank holds for these tensors (its shard of a sharded one)."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None)
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def memory_per_rank(student: nn.Module, teacher: nn.Module | None, optimizers: list, device: torch.device,
                    dist: Dist) -> list[dict[str, float]]:
    """Per rank: MB of student weights + gradients, teacher weights, optimizer state, and the peak.
    Each rank's shards; the peak is the process's CUDA allocation, on CPU its peak RSS (Python and
    libraries included). Gradients are counted at full size: they are freed after each step (zero_grad)."""
    import resource
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    params = [p for p in student.parameters() if p.requires_grad]
    mine = [2 * local_mb(params) + local_mb(p for p in student.parameters() if not p.requires_grad),
            local_mb(teacher.parameters()) if teacher is not None else 0.0,
            local_mb(v for opt in optimizers for st in opt.state.values()
                     for v in st.values() if torch.is_tensor(v)),
            peak]
    table = [0.0] * (4 * dist.world)
    table[4 * dist.rank:4 * dist.rank + 4] = mine
    table = all_reduce_sum(table, dist)
    names = ("student_mb", "teacher_mb", "optimizer_mb", "peak_mb")
    return [dict(zip(names, table[4 * r:4 * r + 4])) for r in range(dist.world)]


def is_sharded(model: nn.Module) -> bool:
    """Is this an FSDP2 (fully_shard) model, whose forward is a collective over all ranks?"""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)
