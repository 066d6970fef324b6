"""palmcore/__init__.py bounds OpenMP's idle spin (GOMP_SPINCOUNT) for libgomp as it loads, and
leaves the environment as it found it; the user's own settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = ("import os, json, palmcore\n"
         "print(json.dumps({k: os.environ.get(k) for k in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')}))")


def run(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY",
                                                             "PALMCORE_OMP_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("env", [{}, {"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "passive"},
                                 {"PALMCORE_OMP_DEFAULTS": "0"}])
def test_the_environment_is_left_as_it_was(env):
    got = run(**env)
    assert got == {k: env.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


def test_libgomp_reads_the_bounded_spin_as_it_loads(tmp_path):
    """GOMP_SPINCOUNT is set while _core, and with it libgomp, loads (libgomp reads it then; a
    module imported earlier that loaded libgomp itself would defeat this: numpy does not)."""
    import palmcore  # noqa: PLC0415

    code = ("import os, builtins\n"
            "seen = {}\n"
            "real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'palmcore' and a and a[2] and '_core' in a[2]:\n"
            "        seen.setdefault('spin', os.environ.get('GOMP_SPINCOUNT'))\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            "import palmcore\n"
            "print(seen.get('spin'))\n")
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY",
                                                             "PALMCORE_OMP_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == str(palmcore.OMP_SPIN_COUNT)
