"""Run under mpiexec by test_distributed.py: the mesh's two communicators against NumPy, on
float32, float64 and bfloat16 (uint16 bits) arrays.

    mpiexec -n D·M python tests/mpi_collectives.py D M          # checks, prints "OK <rank>"
    mpiexec -n 2 python tests/mpi_collectives.py 2 1 die        # rank 1 dies before a collective
    mpiexec -n 2 python tests/mpi_collectives.py 2 1 raise      # rank 1 raises instead
"""

import os
import sys

import numpy as np

import palmcore



def to_bf16(x):
    """bfloat16 bits (uint16) of values that bfloat16 holds exactly."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bf16(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


data, model = int(sys.argv[1]), int(sys.argv[2])
mesh = palmcore.Mesh(data=data, model=model)
r = mesh.world_rank
if sys.argv[3:] in (["die"], ["raise"]):
    if r == 1 and sys.argv[3] == "die":
        os._exit(3)
    if r == 1:
        raise RuntimeError("rank 1 fails")
    mesh.data_comm.all_reduce_sum(np.ones(4, np.float32))   # never completes: rank 1 is gone
    sys.exit(0)

assert (mesh.data_index, mesh.model_index) == (r // model, r % model)
for comm, group, index in ((mesh.model_comm, [mesh.data_index * model + m for m in range(model)], mesh.model_index),
                           (mesh.data_comm, [d * model + mesh.model_index for d in range(data)], mesh.data_index)):
    n = len(group)
    assert (comm.size, comm.rank) == (n, index), (comm.size, comm.rank, n, index)
    sent = 0
    # float32 and float64 as they are; bfloat16 as uint16 bits (values exact in bfloat16: the sums
    # are small integers times powers of two)
    for dtype, to_array, from_array in ((np.float32, np.float32, np.asarray), (np.float64, np.float64, np.asarray),
                                        (np.uint16, to_bf16, from_bf16)):
        size = np.dtype(dtype).itemsize
        base = np.arange(1, 7) / 8
        x = to_array(base * (r + 1))
        comm.all_reduce_sum(x)
        assert np.allclose(from_array(x), base * sum(g + 1 for g in group), rtol=1e-6), (dtype, x)
        y = to_array(base * (r + 1) * (-1) ** r)
        comm.all_reduce_max(y)
        assert np.array_equal(from_array(y), np.max([base * (g + 1) * (-1) ** g for g in group], axis=0)), (dtype, y)
        blocks = to_array(np.arange(3 * n) * (r + 1))
        mine = from_array(comm.reduce_scatter_sum(blocks))
        want = np.arange(3 * n)[3 * index: 3 * index + 3] * sum(g + 1 for g in group)
        assert mine.dtype == from_array(blocks).dtype and np.array_equal(mine, want), (dtype, mine, want)
        gathered = from_array(comm.all_gather(to_array(np.full(2, float(r)))))
        assert np.array_equal(gathered, np.repeat(np.array(group), 2)), (dtype, gathered)
        sent += 2 * (n - 1) * 6 * size // n * 2 + (n - 1) * 3 * n * size // n + (n - 1) * 2 * n * size // n
    assert comm.bytes_sent == sent, (comm.bytes_sent, sent)
mesh.barrier()
os.write(1, f"OK {r}\n".encode())  # one write: ranks share stdout
