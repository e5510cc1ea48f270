"""The one quantile rule of every figure we print: `multillm logs stats` and the benchmark alike."""

from __future__ import annotations

import math
from collections.abc import Sequence


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile (0..1): a value that was actually observed, never an
    interpolation. `sorted_values` must not be empty."""
    return sorted_values[max(1, math.ceil(q * len(sorted_values))) - 1]
