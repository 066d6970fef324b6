"""The device mesh over the launcher's world: ``palmcore.Mesh(data=D, model=M)``.

World rank r sits at (data index r // M, model index r % M): the ranks of one model group are
neighbours. Each axis gets a communicator of the C++ runtime (``palmcore._core.Communicator``):
a single-rank one for an axis of size 1; otherwise, for a model on the CPU an MPI one (through
mpi4py and MPICH, the ``mpi`` extra), for a model on GPUs (``device="cuda"``) a NCCL one whose
unique id rank 0 of the axis group makes and sends to the others over MPI. Launch with
``mpiexec -n D·M``.

GPUs: one per rank. With ``device="cuda"`` a rank uses ``cuda:L``, L its local rank: its rank
among the ranks on the same node (MPI's shared-memory split, whatever the launcher), so that
``mpiexec -n 8`` on an 8-GPU node gives each rank its own GPU. ``device="cuda:N"`` is taken as
it is (for launchers that give each rank one visible GPU through CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback

from palmcore import _core
from palmcore.plan import MeshShape

# Set by MPI launchers (MPICH's hydra, Open MPI, Slurm's PMI): the process is one rank of many.
_LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


def _mpi():
    try:
        from mpi4py import MPI  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("a mesh of more than one rank needs MPI: pip install 'palmcore[mpi]' "
                           "(mpi4py and MPICH), then launch with mpiexec") from None
    if not _core.built_with_mpi():
        raise RuntimeError("this palmcore was built without MPI (no MPICH mpi.h at build time); "
                           "reinstall it with pip install '.[mpi]'")
    return MPI


def _gpu_of_local_rank(world, MPI) -> str:
    """"cuda:L", L this rank's index among the ranks on its node (collective over the world);
    RuntimeError when the node has no GPU L."""
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        local = node.Get_rank()
    finally:
        node.Free()
    reason = _core.cuda_unavailable_reason()
    if reason:
        raise RuntimeError(f"device 'cuda' cannot be used on rank {world.Get_rank()}: {reason}")
    count = len(_core.cuda_devices())
    if local >= count:
        raise RuntimeError(f"rank {world.Get_rank()} is rank {local} on its node, which has {count} CUDA "
                           f"devices: launch at most one rank per GPU on each node")
    return f"cuda:{local}"


def _abort_on_uncaught_exceptions(world) -> None:
    """An uncaught exception on one rank aborts the whole job (after printing it), rather than
    leaving the other ranks waiting in a collective for a rank that is gone (mpi4py's advice:
    its `python -m mpi4py` runner does the same)."""
    if getattr(sys.excepthook, "_palmcore_abort", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if previous is sys.__excepthook__:
            # the whole report in one write, then a moment for the launcher to forward it
            # before the abort ends every process (a report cut at its first line said nothing)
            sys.stderr.flush()
            os.write(2, "".join(traceback.format_exception(kind, value, tb)).encode(errors="replace"))
            time.sleep(0.5)
        else:
            previous(kind, value, tb)
            sys.stderr.flush()
        world.Abort(1)

    hook._palmcore_abort = True
    sys.excepthook = hook


class Mesh:
    """A ``data`` x ``model`` grid of the launcher's ranks, with one communicator per axis, for
    models on ``device`` ("cpu", "cuda" or "cuda:N"; see the module's note on GPUs)."""

    def __init__(self, data: int = 1, model: int = 1, device: str = "cpu"):
        self.shape = MeshShape(data, model)
        if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        self.device = device
        if self.shape.size == 1 and not launched_by_mpi():
            self.world_rank, self.world_size = 0, 1
            self._comms = []
            self.model_comm = _core.Communicator.single_rank()
            self.data_comm = _core.Communicator.single_rank()
        else:
            MPI = _mpi()
            world = MPI.COMM_WORLD
            self.world_rank, self.world_size = world.Get_rank(), world.Get_size()
            if self.world_size != self.shape.size:
                raise ValueError(f"mesh data={data} x model={model} needs {self.shape.size} ranks, but the world "
                                 f"has {self.world_size} (launch with mpiexec -n {self.shape.size})")
            _abort_on_uncaught_exceptions(world)  # after the checks every rank makes alike
            if device == "cuda":
                self.device = _gpu_of_local_rank(world, MPI)
            # keep the mpi4py communicators alive as long as the C++ ones use their handles
            self._comms = [world.Split(self.data_index, self.model_index),   # one model group
                           world.Split(self.model_index, self.data_index)]   # one data group
            self.model_comm, self.data_comm = (self._communicator(c) for c in self._comms)

    def _communicator(self, group):
        """The C++ communicator of one axis group (an mpi4py communicator)."""
        if group.Get_size() == 1:
            return _core.Communicator.single_rank()
        if self.device == "cpu":
            return _core.Communicator.mpi(group.py2f())
        unique_id = group.bcast(_core.nccl_unique_id() if group.Get_rank() == 0 else None, root=0)
        return _core.Communicator.nccl(unique_id, group.Get_rank(), group.Get_size(), device=self.device)

    def model_device(self, device: str) -> str:
        """The device a model on this mesh lives on when asked for ``device``: "cuda" is this
        rank's GPU when the mesh is on GPUs; anything else is taken as it is."""
        return self.device if device == "cuda" and self.device.startswith("cuda") else device

    @property
    def data(self) -> int:
        return self.shape.data

    @property
    def model(self) -> int:
        return self.shape.model

    @property
    def data_index(self) -> int:
        return self.world_rank // self.shape.model

    @property
    def model_index(self) -> int:
        return self.world_rank % self.shape.model

    @property
    def is_main(self) -> bool:
        """World rank 0: the one that prints and writes logs."""
        return self.world_rank == 0

    def barrier(self) -> None:
        if self._comms:
            self._comms[0].Barrier()
            self._comms[1].Barrier()

    def print(self, *args, **kwargs) -> None:
        """print() on the main rank only."""
        if self.is_main:
            print(*args, **kwargs)
            sys.stdout.flush()

    def __repr__(self) -> str:
        return (f"Mesh(data={self.data}, model={self.model}; rank {self.world_rank} at "
                f"data {self.data_index}, model {self.model_index})")
