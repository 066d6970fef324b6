"""The planner against the PaLM paper's numbers and its own accounting."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from palmcore.config import PaLMConfig
from palmcore.plan import MeshShape, activations_per_token, plan

PALM = PaLMConfig.preset("palm-540b")


def test_palm_540b_on_two_pods_matches_the_paper():
    """PaLM 540B: 540.35B parameters; 2 pods x 3072 TPU v4 chips (data 2x256, model 12),
    batch 2048 x 2048, 46.2% MFU at 275 TFLOP/s per chip -> 238.3K tokens/s (paper, Table 3
    and section 4.1); 6N + 12·L·H·dh·T FLOPs per token."""
    p = plan(PALM, MeshShape(data=512, model=12), batch=2048, seq=2048, peak_flops=275e12, mfu=0.462)
    assert abs(PALM.num_params() - 540.35e9) < 0.01e9
    assert p.model_flops * 6144 == pytest.approx((6 * PALM.num_params() + 12 * 118 * 48 * 256 * 2048) * 2048 * 2048)
    assert p.tokens_per_second == pytest.approx(238.3e3, rel=2e-3)
    assert p.hardware_flops_remat == pytest.approx(p.model_flops * 4 / 3)


@pytest.mark.parametrize("data,model", [(1, 1), (2, 1), (1, 2), (4, 8), (256, 12)])
def test_shards_add_up_to_the_model(data, model):
    """Over the model axis the shards hold every parameter once, plus the replicated ones
    (norms, wk, wv) on every rank; the vocabulary is padded to a multiple of the axis."""
    p = plan(PALM, MeshShape(data, model), batch=2048, seq=2048)
    D, L = PALM.d_model, PALM.n_layers
    replicated = L * (D + 2 * D * PALM.n_kv_heads * PALM.head_dim) + D
    padding = (p.vocab_shard * model - PALM.vocab_size) * D
    assert p.params * model - (model - 1) * replicated == PALM.num_params() + padding
    assert p.param_bytes == p.grad_bytes == 4 * p.params
    assert p.optimizer_bytes == 2 * 4 * -(-p.params // data)


def test_activations_and_collectives_follow_the_layout():
    cfg = PaLMConfig.preset("seed")
    mesh = MeshShape(data=2, model=2)
    p = plan(cfg, mesh, batch=8, seq=256)
    per_layer, _, outside = activations_per_token(cfg, mesh)
    tokens = 8 // 2 * 256
    heads, ffn, kv = 8 // 2, 1024 // 2, 32
    assert per_layer == 256 + 1 + 256 + heads * 32 + 2 * kv + heads * 32 + heads + 2 * ffn
    # remat keeps each layer's input (D floats) and one layer's full set instead of all six
    assert p.activation_bytes - p.activation_bytes_remat == ((6 - 1) * per_layer - 6 * 256) * tokens * 4
    act = tokens * 256 * 4
    assert p.collectives["model all-reduce, forward (embedding + one per layer)"] == 2 * (1 / 2) * 7 * act
    assert p.collectives["data all-gather, parameters"] == 0.5 * p.param_bytes
    single = plan(cfg, MeshShape(1, 1), batch=8, seq=256)
    assert all(v == 0 for v in single.collectives.values())
    assert single.model_flops == cfg.flops_per_token(256) * 8 * 256


def test_a_mixture_of_experts_plan():
    """seed-moe: every parameter on one device; on a model axis of 2 the experts, wq, wo, the
    dense MLPs and the vocabulary split, the routers, norms, wk and wv replicated; FLOPs count
    the active parameters; an axis that does not divide the experts is refused."""
    cfg = PaLMConfig.preset("seed-moe")
    assert plan(cfg, MeshShape(1, 1), batch=8, seq=256).params == cfg.num_params()
    D, E, Fe, F, kv = 256, 8, 1024, 1024, 32
    replicated = 6 * (D + 2 * D * kv) + 3 * D * E + D
    split = 10000 * D + 6 * 2 * D * 256 + 3 * 3 * D * F + 3 * 3 * E * D * Fe
    p = plan(cfg, MeshShape(1, 2), batch=8, seq=256)
    assert p.params == replicated + split // 2
    assert p.model_flops == cfg.flops_per_token(256) * 8 * 256 / 2
    assert "routers' probability gradients" in " ".join(p.collectives)
    with pytest.raises(ValueError, match=r"the model axis \(3\) must divide n_experts \(8\)"):
        plan(PaLMConfig.preset("seed-moe", n_heads=6, head_dim=32, ffn_dim=1026, vocab_size=9999), MeshShape(1, 3),
             batch=8, seq=256)


@pytest.mark.parametrize("mesh,kw,match", [
    (MeshShape(1, 7), {}, r"the model axis \(7\) must divide n_heads \(48\)"),
    (MeshShape(1, 32), {}, r"the model axis \(32\) must divide n_heads \(48\)"),
    (MeshShape(3, 1), {}, r"the data axis \(3\) must divide the batch \(2048\)"),
    (MeshShape(1, 1), {"seq": 4096}, r"seq 4096 > max_seq_len 2048"),
    (MeshShape(1, 1), {"mfu": 1.5}, r"mfu must be in \(0, 1\], got 1.5"),
    (MeshShape(1, 1), {"mfu": 0.0}, r"mfu must be in \(0, 1\], got 0.0"),
    (MeshShape(1, 1), {"peak_flops": float("inf")}, r"peak_flops must be finite and > 0, got inf"),
    (MeshShape(1, 1), {"peak_flops": float("nan")}, r"peak_flops must be finite and > 0, got nan"),
    (MeshShape(1, 1), {"peak_flops": -1.0}, r"peak_flops must be finite and > 0, got -1.0"),
])
def test_bad_plans(mesh, kw, match):
    with pytest.raises(ValueError, match=match):
        plan(PALM, mesh, **{"batch": 2048, "seq": 2048, **kw})


def test_mesh_parsing_and_checks():
    assert MeshShape.parse("data=2,model=4") == MeshShape(2, 4)
    assert MeshShape.parse("model=3") == MeshShape(1, 3) and MeshShape.parse("") == MeshShape(1, 1)
    for text in ("data=2,data=3", "pipeline=2", "data=x", "data2"):
        with pytest.raises(ValueError, match="mesh"):
            MeshShape.parse(text)
    with pytest.raises(ValueError, match="must be a positive integer"):
        MeshShape(0, 1)
    with pytest.raises(ValueError, match=r"the model axis \(12\) must divide vocab_size \(256000\)"):
        MeshShape(1, 12).check(PALM)
    with pytest.raises(ValueError, match=r"the model axis \(3\) must divide ffn_dim \(1024\)"):
        MeshShape(1, 3).check(PaLMConfig.preset("seed", n_heads=6, head_dim=32))


def test_cli_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "palmcore", "plan", "--preset", "palm-540b", "--mesh",
                           "data=256,model=12", "--batch", "2048", "--seq", "2048"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "3072 devices" in done.stdout and "119,0" in done.stdout and "padded 256,000 -> 256,008" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "palmcore", "plan", "--mesh", "data=1,model=5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must divide n_heads" in bad.stderr


@pytest.mark.parametrize("flag,value,match", [
    ("--peak-tflops", "inf", "must be finite and > 0, got inf"),
    ("--peak-tflops", "nan", "must be finite and > 0, got nan"),
    ("--peak-tflops", "0", "must be finite and > 0, got 0.0"),
    ("--peak-tflops", "-5", "must be finite and > 0, got -5.0"),
    ("--mfu", "1.5", r"must be in \(0, 1\], got 1.5"),
    ("--mfu", "0", r"must be in \(0, 1\], got 0.0"),
])
def test_cli_refuses_a_rate_that_is_not_one(flag, value, match, capsys):
    """--peak-tflops inf used to end in a ZeroDivisionError traceback, nan in an unnamed refusal."""
    from palmcore.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", flag, value])
    assert exit_info.value.code == 2
    assert re.search(rf"palmcore plan: error: argument {flag}: {match}", capsys.readouterr().err)
