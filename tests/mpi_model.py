"""Run under mpiexec by test_distributed.py: K Adafactor steps of a tiny PaLM on a data x model
mesh, same global batch and seed on every mesh. The main rank saves the per-step losses, the
first step's logits and the gathered parameters to OUT (an .npz).

    mpiexec -n D·M python tests/mpi_model.py D M OUT [DEVICE] [moe]

DEVICE: "cpu" (the default; MPI collectives) or "cuda" (one GPU per rank; NCCL collectives).
moe: the second layer is a mixture of 4 experts (top-2), split over the model axis; its
routing statistics (the auxiliary losses) cover every data rank's rows.
"""

import os
import sys

import numpy as np

import palmcore
from palmcore.config import PaLMConfig

data, model, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
moe = len(sys.argv) > 5 and sys.argv[5] == "moe"
mesh = palmcore.Mesh(data=data, model=model, device=device)
# GQA 4 -> 2 heads, odd sizes elsewhere; heads, ffn and vocab divisible by 2
cfg = PaLMConfig(vocab_size=38, d_model=12, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, ffn_dim=22,
                 max_seq_len=16, z_loss=1e-2,
                 **(dict(n_experts=4, expert_top_k=2, expert_ffn_dim=10, moe_every=2, router_aux_loss=0.1,
                         router_z_loss=0.01) if moe else {}))
m = palmcore.PaLM(cfg, seed=3, mesh=mesh, device=device)
D, H, F, V, kv = cfg.d_model, cfg.n_heads // model, cfg.ffn_dim // model, cfg.vocab_size // model, 2 * 6
attention = D + 2 * D * H * 6 + 2 * D * kv
experts = D * 4 + 4 // model * 3 * D * 10  # the router (replicated) and this rank's experts
mlps = 3 * D * F + (experts if moe else 3 * D * F)
assert m.num_params() == V * D + cfg.n_layers * attention + mlps + D  # its shards only
opt = palmcore.Adafactor(m)
assert opt._opt.state_share == -(-m.num_params() // data)  # moments of this data rank's share only
B, T, K = 4, 9, 3
rng = np.random.default_rng(0)
losses, logits = [], None
for step in range(K):
    batch = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
    rows = batch[mesh.data_index * B // data:(mesh.data_index + 1) * B // data]
    if step == 0:
        logits = m.forward(rows[:, :-1])
    m.zero_grad()
    o = m.forward_backward(rows[:, :-1], rows[:, 1:], total_tokens=B * T)
    sums = np.array([o["loss"] * o["tokens"], o["tokens"]], np.float32)
    mesh.data_comm.all_reduce_sum(sums)
    losses.append(sums[0] / sums[1])
    opt.step(lr=1e-2, max_grad_norm=0.5)
params = m.state_dict()
all_logits = mesh.data_comm.all_gather(np.ascontiguousarray(logits, np.float32).ravel())
if mesh.is_main:
    np.savez(out, losses=np.array(losses), logits=all_logits.reshape(B, T, cfg.vocab_size), **params)
os.write(1, f"OK {mesh.world_rank}\n".encode())  # one write: ranks share stdout
