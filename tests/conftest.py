"""Fixtures shared by the training and generation tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of eight small Python-like files."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "x", "y", "(", ")", ":", " ", "\n", "    ", "1", "2", "+", "="]
    for i in range(8):
        (folder / f"f{i}.py").write_text("".join(rng.choice(words, size=400)))
    return str(folder)
