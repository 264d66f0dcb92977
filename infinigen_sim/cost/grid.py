"""Small numerics of the measured tables: a log-log grid of seconds and a non-negative affine fit.

`Grid` is kept by hand rather than built on scipy's RegularGridInterpolator because every lookup must
also say whether it was exact: inside the grid and interpolated from measured nodes only (a node the
collection did not measure is filled from the nearest measured one and remembered as filled).
`fit_affine` is an exact non-negative least squares by enumerating active sets: the fits here have two
or three terms (at most 8 sets), and the simulator must run on GPU nodes that have numpy but not scipy
(experiments/gpu/README.md); tests/test_calibrate.py checks it against scipy.optimize.nnls.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Seconds on a rectangular grid of log coordinates; unmeasured nodes filled (and remembered)."""

    axes: tuple[str, ...]
    nodes: tuple[np.ndarray, ...]  # sorted log(value) per axis
    log_s: np.ndarray  # log seconds at every node, shape (len(nodes[0]), ...)
    measured: np.ndarray  # bool, same shape: False where the node was filled

    @classmethod
    def build(cls, axes: tuple[str, ...], points: dict[tuple[float, ...], float],
              ratio: Callable[[tuple[float, ...], tuple[float, ...]], float]) -> Grid:
        """`points` {coordinates: seconds}; a missing node = nearest measured one x ratio(node, that one)."""
        nodes = tuple(np.log(sorted({p[i] for p in points})) for i in range(len(axes)))
        shape = tuple(len(n) for n in nodes)
        log_s, measured = np.zeros(shape), np.zeros(shape, dtype=bool)
        known = {tuple(round(math.log(v), 9) for v in p): (p, s) for p, s in points.items()}
        have = np.array([[math.log(v) for v in p] for p in points])
        for index in itertools.product(*(range(n) for n in shape)):
            coords = tuple(float(nodes[a][i]) for a, i in enumerate(index))
            hit = known.get(tuple(round(c, 9) for c in coords))
            if hit is not None:
                log_s[index], measured[index] = math.log(hit[1]), True
                continue
            nearest = int(np.argmin(((have - np.array(coords)) ** 2).sum(axis=1)))
            anchor = tuple(points)[nearest]
            value = tuple(math.exp(c) for c in coords)
            log_s[index] = math.log(points[anchor] * ratio(value, anchor))
        return cls(axes, nodes, log_s, measured)

    def lookup(self, query: tuple[float, ...]) -> tuple[float, tuple[float, ...], bool]:
        """(seconds at the query clamped into the grid, the clamped query, exact) where exact means
        inside the grid and interpolated from measured nodes only."""
        exact, corners = True, []
        clamped = []
        for axis, value in zip(self.nodes, query, strict=True):
            x = math.log(max(value, 1e-300))
            lo, hi = float(axis[0]), float(axis[-1])
            if x < lo - 1e-9 or x > hi + 1e-9:
                exact = False
            x = min(max(x, lo), hi)
            clamped.append(math.exp(x))
            i = int(np.searchsorted(axis, x, side="right")) - 1
            i = min(max(i, 0), len(axis) - 1)
            if i == len(axis) - 1 or abs(x - axis[i]) < 1e-12:
                corners.append(((i, 1.0),))
            else:
                frac = (x - axis[i]) / (axis[i + 1] - axis[i])
                corners.append(((i, 1.0 - frac), (i + 1, frac)))
        log_s = 0.0
        for combo in itertools.product(*corners):
            weight = math.prod(w for _, w in combo)
            if weight <= 0:
                continue
            index = tuple(i for i, _ in combo)
            log_s += weight * self.log_s[index]
            exact = exact and bool(self.measured[index])
        return math.exp(log_s), tuple(clamped), exact


def fit_affine(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients c minimising the relative error of features @ c against seconds (exact NNLS)."""
    weighted = features / seconds[:, None]
    target = np.ones(len(seconds))
    best, best_cost = np.zeros(features.shape[1]), float(target @ target)
    for size in range(1, features.shape[1] + 1):
        for active in itertools.combinations(range(features.shape[1]), size):
            coef = np.linalg.lstsq(weighted[:, active], target, rcond=None)[0]
            if (coef < 0).any():
                continue  # not feasible on this active set; a smaller set covers its boundary
            residual = weighted[:, active] @ coef - target
            cost = float(residual @ residual)
            if cost < best_cost - 1e-15 * max(best_cost, 1.0):
                best, best_cost = np.zeros(features.shape[1]), cost
                best[list(active)] = coef
    return best
