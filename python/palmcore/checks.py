"""Argument checks shared by the Python face: one error type per kind of mistake.

- A value of the wrong kind (a float where an integer belongs, a bool, a string, None) raises
  ``TypeError`` naming the argument and what it got.
- A value of the right kind but outside its range (negative, NaN, too large for the C++ core)
  raises ``ValueError`` naming the argument, the range and what it got.

    seed = checks.integer("seed", seed, 0, 2**64 - 1)
    temperature = checks.real("temperature", temperature, low=0.0)
"""

from __future__ import annotations

import math
import numbers

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int (Python or NumPy integers; bools are refused), in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {_range(low, high)}, got {value}")
    return value


def real(name: str, value, low: float | None = None, high: float | None = None,
         low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float's range
        value = math.inf if value > 0 else -math.inf
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        if low is None and high is None:
            what = "finite"
        elif low is None or high is None:
            what = f"finite and {_range(low, high, low_open)}"
        else:
            what = _range(low, high, low_open)
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def _range(low, high, low_open: bool = False) -> str:
    """'in [0, 1]', 'in (0, 1]', '>= 0', '> 0' or '<= 9'."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_number(low)}, {_number(high)}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {_number(low)}"
    return f"<= {_number(high)}"


def _number(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"
