"""Run under mpiexec by test_distributed.py: the mesh's two communicators against NumPy.

    mpiexec -n D·M python tests/mpi_collectives.py D M          # checks, prints "OK <rank>"
    mpiexec -n 2 python tests/mpi_collectives.py 2 1 die        # rank 1 dies before a collective
    mpiexec -n 2 python tests/mpi_collectives.py 2 1 raise      # rank 1 raises instead
"""

import os
import sys

import numpy as np

import palmcore

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
    base = np.arange(1, 7, dtype=np.float32) / 7
    x = base * (r + 1)
    comm.all_reduce_sum(x)
    assert np.allclose(x, base * sum(g + 1 for g in group), rtol=1e-6), x
    y = base * (r + 1) * (-1) ** r
    comm.all_reduce_max(y)
    assert np.allclose(y, np.max([base * (g + 1) * (-1) ** g for g in group], axis=0)), y
    blocks = np.arange(3 * n, dtype=np.float32) * (r + 1)
    mine = comm.reduce_scatter_sum(blocks)
    want = np.arange(3 * n, dtype=np.float32)[3 * index: 3 * index + 3] * sum(g + 1 for g in group)
    assert np.allclose(mine, want), (mine, want)
    gathered = comm.all_gather(np.full(2, float(r), np.float32))
    assert np.array_equal(gathered, np.repeat(np.array(group, np.float32), 2)), gathered
    sent = 2 * (n - 1) * 24 // n * 2 + (n - 1) * 12 * n // n + (n - 1) * 8 * n // n
    assert comm.bytes_sent == sent, (comm.bytes_sent, sent)
mesh.barrier()
os.write(1, f"OK {r}\n".encode())  # one write: ranks share stdout
