"""One process, `mpiexec -n K`, or `torchrun`: process-group setup, device choice, gathers, file reads.

Everything here is also correct in a single process without a process group, so scripts call
the same helpers whatever the launch.
"""

import atexit
import io
import os
import pickle
import socket

import torch
import torch.distributed as dist

from .atomic import write_failure

# Environment variables that MPI launchers set for each rank (MPICH/Hydra, Open MPI, PMIx, Intel MPI).
MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")

_local_rank = 0
_device_override = None
_gpus_per_node = None


def launched_by_mpi():
    return any(v in os.environ for v in MPI_RANK_VARS) and "RANK" not in os.environ


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def setup_dist(device=None, gpus_per_node=None, backend=None):
    """Join the process group of an mpiexec or torchrun launch (nothing to do for one process).

    :param device: "cpu", "cuda" or "cuda:N" to override the automatic choice.
    :param gpus_per_node: GPUs to spread the node's ranks over (default: all visible).
    :param backend: "nccl" or "gloo" (default: nccl on GPUs, gloo on CPU).
    """
    global _local_rank, _device_override, _gpus_per_node
    _device_override = device
    _gpus_per_node = gpus_per_node
    if dist.is_initialized():
        return
    if launched_by_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif launched_by_mpi():
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, world_size = comm.Get_rank(), comm.Get_size()
        _local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        # rendezvous: rank 0 chooses the address and a free port and tells everyone
        addr, port = comm.bcast((socket.gethostbyname(socket.getfqdn()), _free_port()) if rank == 0 else None, root=0)
        if world_size > 1:
            os.environ.setdefault("MASTER_ADDR", addr)
            os.environ.setdefault("MASTER_PORT", str(port))
    else:
        return
    if world_size == 1:
        return
    on_gpu = dev().type == "cuda"
    if on_gpu:
        torch.cuda.set_device(dev())
    dist.init_process_group(
        backend=backend or ("nccl" if on_gpu else "gloo"),
        init_method="env://",
        rank=rank,
        world_size=world_size,
    )
    # a process group left to the interpreter's exit can take the process down with std::terminate (a backend
    # thread still joinable while its objects are destroyed): leave it explicitly, also when a script fails
    atexit.register(leave_process_group, wait_for_all=False)


def leave_process_group(wait_for_all=True):
    """Destroy the process group (nothing to do in one process). `wait_for_all`: first a barrier, so no rank closes
    its connections while another still reads from them (a clean end of a script; not after an error, where the
    other ranks may never arrive)."""
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def dev():
    """This process's device: the override given to setup_dist, else its GPU (local rank modulo
    GPUs per node), else the CPU."""
    if _device_override and _device_override != "cuda":
        return torch.device(_device_override)
    if _device_override == "cuda" or torch.cuda.is_available():
        n = _gpus_per_node or torch.cuda.device_count()
        return torch.device(f"cuda:{_local_rank % n}")
    return torch.device("cpu")


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather(tensor):
    """The tensors of all ranks, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [tensor]
    out = [torch.zeros_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def all_reduce_mean(tensor):
    """The mean of `tensor` over all ranks (the tensor itself in one process)."""
    if not dist.is_initialized():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / get_world_size()


def broadcast_from_rank0(tensor):
    """Rank 0's value of `tensor` on every rank."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.broadcast(tensor, 0)
    return tensor


def write_on_rank0(writes, advice):
    """Each (path, write) of `writes` in order on rank 0 (atomic writes, cm.atomic: a failed one leaves no half file);
    the first that fails (an OSError, or torch.save's RuntimeError: a full disk, a folder made read-only) stops every
    rank with one line naming its path, then `advice`."""
    failure = ""
    if get_rank() == 0:
        for path, write in writes:
            try:
                write()
            except (OSError, RuntimeError) as err:
                failure = write_failure(path, err)
                break
    if broadcast_from_rank0(torch.tensor([float(bool(failure))], device=dev())).item():
        raise ValueError(f"{failure or 'rank 0 could not write a file'}; {advice}")


@torch.no_grad()
def sync_params(params):
    """Copy rank 0's values of `params` to every rank (nothing to do in one process)."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p, 0)


def load_state_dict(path, map_location="cpu"):
    """Read a checkpoint (a plain state dict) once on rank 0 and share its bytes with the other ranks;
    loaded with weights_only=True (no pickled code runs)."""
    if get_world_size() == 1:
        data = _read_bytes(path)
    else:
        holder = [_read_bytes(path) if get_rank() == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        data = holder[0]
    return read_weight_file(path, io.BytesIO(data), map_location=map_location)


def read_weight_file(path, source=None, map_location="cpu", mmap=False, what="checkpoint", fix=""):
    """torch.load(source or path, weights_only=True): the one reader of weight files, which never runs pickled
    code; a file of pickled objects or an unreadable one raises one line naming `path` (`what` it is, and `fix`)."""
    try:
        return torch.load(source or path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as err:
        if "Unsupported global" in str(err):  # (weights_only met a class or function it would have to run)
            raise ValueError(
                f"{path} holds pickled objects other than tensors and plain containers, which are never run here; "
                "re-save its weights as a plain state dict (torch.save(model.state_dict(), path))"
            ) from err
        reason = type(err).__name__ if isinstance(err, pickle.UnpicklingError) else (
            str(err).split(". ")[0].splitlines() or [type(err).__name__])[0][:200]  # torch's first sentence
        raise ValueError(f"cannot read {what} {path}: truncated, or not a file written by torch.save ({reason}){fix}") from err


def _read_bytes(path):
    import blobfile as bf

    if not bf.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (check --model_path / --resume_checkpoint)")
    with bf.BlobFile(path, "rb") as f:
        return f.read()
