"""One-off check that bench/torch_palm.py computes PALM_SPEC.md's loss and gradients.

Not a pytest test (torch is never a dependency of palmcore or its CI). Run it with a Python
that has torch, e.g.

    /work/torchvenv/bin/python bench/check_torch_palm.py

For a few tiny configurations with random weights it compares TorchPaLM's loss, ce and
every gradient against the float64 NumPy oracle palmcore/reference.py (when present), in
float64 and in float32, and also checks TorchPaLM's float64 gradients against central finite
differences of its own loss along random directions. Prints relative errors; exits 1 on a
failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join(os.path.dirname(HERE), "python", "palmcore")
sys.path.insert(0, HERE)

from torch_palm import TorchPaLM  # noqa: E402


def _load(name, filename):
    """Load a palmcore module by path, so that this works before the C++ core is built."""
    path = os.path.join(PKG, filename)
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


PaLMConfig = _load("_palmcore_config", "config.py").PaLMConfig
reference = _load("_palmcore_reference", "reference.py")


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-300))


def random_state_dict(cfg, seed, dtype=np.float32):
    """Spec-init weights, with norm scales 1 + 0.2 N(0, 1) so their gradients matter."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in cfg.param_shapes().items():
        if name.endswith("norm.scale"):
            w = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            std = 1.0 if name == "embed" else shape[0] ** -0.5
            w = std * rng.standard_normal(shape)
        sd[name] = w.astype(dtype)
    return sd


def cases():
    """(label, cfg, B, T, ignore_some_targets)."""
    return [
        ("mqa V50 D32 L2 H4 Hkv1 F48", PaLMConfig(vocab_size=50, d_model=32, n_layers=2,
                                                  n_heads=4, n_kv_heads=1, ffn_dim=48),
         2, 9, False),
        ("mqa, z_loss 1e-2, ignored targets", PaLMConfig(vocab_size=50, d_model=32, n_layers=2,
                                                          n_heads=4, n_kv_heads=1, ffn_dim=48,
                                                          z_loss=1e-2),
         2, 9, True),
        ("gqa H6 Hkv2 dh6 (!= D/H), base 100", PaLMConfig(vocab_size=29, d_model=10, n_layers=1,
                                                          n_heads=6, n_kv_heads=2, head_dim=6,
                                                          ffn_dim=14, rope_base=100.0,
                                                          z_loss=1e-2, norm_eps=1e-3),
         3, 7, True),
        ("mha H3 Hkv3", PaLMConfig(vocab_size=23, d_model=12, n_layers=2, n_heads=3,
                                   n_kv_heads=3, ffn_dim=18), 2, 5, False),
    ]


def finite_difference_errors(model, tokens, targets, n_dirs, eps, seed):
    """Per parameter: rel. error of <grad, d> vs (L(w + eps d) - L(w - eps d)) / (2 eps),
    the worst over n_dirs random unit directions d. model must be float64."""
    model.train_step(tokens, targets)
    grads = model.grads()
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in model.params.items():
        worst = 0.0
        for _ in range(n_dirs):
            d = rng.standard_normal(tuple(p.shape))
            d /= np.linalg.norm(d)
            dt = torch.tensor(d, dtype=p.dtype)
            with torch.no_grad():
                p += eps * dt
                lp = float(model.loss(tokens, targets)[0])
                p -= 2 * eps * dt
                lm = float(model.loss(tokens, targets)[0])
                p += eps * dt
            fd = (lp - lm) / (2 * eps)
            an = float((grads[name] * d).sum())
            worst = max(worst, abs(fd - an) / max(abs(an), abs(fd), 1e-12))
        out[name] = worst
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float64", "float32", "both"], default="both",
                    help="TorchPaLM dtype(s) to compare against the reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fd-dirs", type=int, default=3,
                    help="random directions per parameter for the finite-difference check")
    args = ap.parse_args()
    dtypes = {"float64": [torch.float64], "float32": [torch.float32],
              "both": [torch.float64, torch.float32]}[args.dtype]
    # float64 must agree with the float64 oracle to rounding; float32 to single precision.
    tol = {torch.float64: 1e-9, torch.float32: 2e-4}
    fd_tol = 1e-6
    failures = []
    if reference is None:
        print("note: python/palmcore/reference.py not found; only the finite-difference check runs")

    for ci, (label, cfg, B, T, ignore) in enumerate(cases()):
        print(f"\n== {label}  (B={B}, T={T}, z_loss={cfg.z_loss})")
        rng = np.random.default_rng(100 + ci)
        sd = random_state_dict(cfg, seed=ci)
        seq = rng.integers(0, cfg.vocab_size, size=(B, T + 1), dtype=np.int64)
        tokens, targets = seq[:, :-1], seq[:, 1:].copy()
        if ignore:
            targets[rng.random(targets.shape) < 0.3] = -1
            targets[0, 0] = -1

        if reference is not None:
            ref = reference.loss_and_grads(sd, cfg, tokens, targets)
            for dt in dtypes:
                m = TorchPaLM(cfg, sd, threads=args.threads, dtype=dt)
                loss, ce = m.loss(tokens, targets)
                m.zero_grad()
                loss.backward()
                g = m.grads()
                loss, ce = float(loss.detach()), float(ce.detach())
                e_loss = rel_err(loss, ref["loss"])
                e_ce = rel_err(ce, ref["ce"])
                gerr = {n: rel_err(g[n], ref["grads"][n]) for n in ref["grads"]}
                worst = max(gerr, key=gerr.get)
                name = str(dt).replace("torch.", "")
                print(f"  vs reference, torch {name}: loss {loss:.10f} "
                      f"(ref {ref['loss']:.10f}) rel err {e_loss:.2e}; ce rel err {e_ce:.2e}; "
                      f"grads max rel err {gerr[worst]:.2e} ({worst}), "
                      f"median {np.median(list(gerr.values())):.2e}")
                bad = max(e_loss, e_ce, gerr[worst])
                if not bad < tol[dt]:
                    failures.append(f"{label}: torch {name} vs reference rel err {bad:.2e}")

        m64 = TorchPaLM(cfg, sd, threads=args.threads, dtype=torch.float64)
        fd = finite_difference_errors(m64, tokens, targets, args.fd_dirs, eps=1e-5, seed=ci)
        worst = max(fd, key=fd.get)
        print(f"  finite differences (float64, {args.fd_dirs} dirs/param): max rel err "
              f"{fd[worst]:.2e} ({worst}), median {np.median(list(fd.values())):.2e}")
        if not fd[worst] < fd_tol:
            failures.append(f"{label}: finite-difference rel err {fd[worst]:.2e}")

    print()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("OK: TorchPaLM matches the spec (reference and finite differences)")


if __name__ == "__main__":
    main()
