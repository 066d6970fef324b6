"""Fixtures shared by the tests: the thread count (``threads``), a small corpus, the backend (``device``)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    """Run the test with palmcore.set_num_threads(n) for n = 1 and 2; restore the previous
    count afterwards (also when the test fails). A module that wants every test run with both
    counts sets ``pytestmark = pytest.mark.usefixtures("threads")``."""
    import palmcore  # noqa: PLC0415  (here, so that collecting tests without it still works)

    old = palmcore.get_num_threads()
    palmcore.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        palmcore.set_num_threads(old)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of eight small Python-like files."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "x", "y", "(", ")", ":", " ", "\n", "    ", "1", "2", "+", "="]
    for i in range(8):
        (folder / f"f{i}.py").write_text("".join(rng.choice(words, size=400)))
    return str(folder)


def _cuda_usable() -> bool:
    import palmcore  # noqa: PLC0415

    return palmcore.cuda_available()


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """The backends to run a test on: "cpu" always, "cuda" where a usable GPU is (otherwise
    skipped with the reason "no CUDA device")."""
    if request.param == "cuda" and not _cuda_usable():
        pytest.skip("no CUDA device")
    return request.param
