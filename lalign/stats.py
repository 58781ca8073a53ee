"""Statistics over seeds: a mean with its Student-t confidence interval (the report's and the demo's tables)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """{'n', 'mean', 'sd', 'low', 'high'}: the mean of `values` with its Student-t confidence interval (None for
    fewer than two values)."""
    from scipy import stats as st  # heavy (seconds to import): only the summaries over seeds need it

    v = np.asarray([x for x in values if x is not None], np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None}
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None}
    sd = float(v.std(ddof=1))
    half = float(st.t.ppf(0.5 + level / 2, n - 1)) * sd / np.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}
