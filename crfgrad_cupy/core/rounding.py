"""Constructive rounding of Proposition 2.1: a labelling x with E(x) <= E(q).

Energy (paper eq. 6) per image: E(q) = ψ·q + ½ qᵀKq, K = Σ terms (see :mod:`pgd`).

The supplement's proof fixes the pixels one after another: with pixels 1..m-1 already
one-hot and m+1..N still at q, E is affine in q_m PROVIDED pixel m does not interact
with itself (the L×L block K_mm has zero symmetric part, e.g. zero centre taps of the
spatial filters).  Then E(..., q_m, ...) = Σ_λ q_{m:λ} E(..., e_λ, ...), so picking
λ = argmin_λ ∂E/∂q_{m:λ} (the conditional energy) never increases E; after the last
pixel, E(x) <= E(q) for every FEASIBLE q (q on the simplex; leak 0).

Schedule: pixels that do not interact can be fixed simultaneously (E is a sum of separate
affine functions of them).  With a finite interaction radius r (spatial filters: r = (k-1)/2)
the pixels are coloured by (y mod (r+1), x mod (r+1)): (r+1)² colour classes, each fixed in one
vectorised step (one gradient = one apply + one adjoint of K per class), so the cost is
(r+1)²·cost(K) for the whole batch.  With an unbounded radius (bilateral / dense terms) the
pixels are fixed one at a time: H·W steps, i.e. O(H·W·cost(K)) — use it on small images only.

When the condition fails (self-interaction, or q infeasible) the same procedure still runs
(it is then a greedy coordinate-wise rounding) but the guarantee does not hold; the result
reports this with ``guaranteed = False`` and the reason.

``schedule``: 'sequential' = the proof's schedule above; 'colour' = colour by the largest FINITE
radius only (at least 1) and update each class at once even where an unbounded term couples its
pixels (a parallel greedy step: (r+1)² steps, no guarantee when such a term is present);
'auto' (default) = 'sequential' unless it would need pixel-by-pixel steps that cannot buy the
guarantee anyway (some term has self-interaction, e.g. the bilateral term), then 'colour'.
So CrfGrad's spatial + bilateral energy is rounded in (k//2 + 1)² steps, spatial-only energies
with zero centre taps by the proof.
"""
from collections import namedtuple

from .. import backend
from .pgd import energy_eq6, energy_gradient

RoundingResult = namedtuple('RoundingResult', ['labels', 'x', 'energy_q', 'energy_x', 'guaranteed',
                                               'self_interaction', 'feasible', 'num_steps', 'schedule'])
RoundingResult.__doc__ = """labels (N, H, W) int; x the one-hot labelling (N, L, H, W); energy_q / energy_x the
eq. (6) energies per image (N,); guaranteed: E(x) <= E(q) is proven (no self-interaction and q feasible);
self_interaction / feasible: the two conditions; num_steps: sequential steps taken; schedule: the one used
('sequential' or 'colour')."""


def is_feasible(q, tol=1e-6):
    """q >= -tol and Σ_λ q_λ = 1 (±tol) at every pixel (axis 1)."""
    xp = backend.get_array_module(q)
    return bool(xp.all(q >= -tol) and xp.all(xp.abs(q.sum(axis=1) - 1) <= tol * q.shape[1] + tol))


def colour_schedule(height, width, radius):
    """List of (ys, xs) NumPy index arrays; the pixels of one entry do not interact.

    radius r: (r+1)² classes (y mod (r+1), x mod (r+1)); radius None: one pixel per entry (row-major).
    """
    import numpy as np
    if radius is None:
        return [(np.array([i // width]), np.array([i % width])) for i in range(height * width)]
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    m = int(radius) + 1
    out = []
    for cy in range(m):
        for cx in range(m):
            ys, xs = np.nonzero(((yy % m) == cy) & ((xx % m) == cx))
            if ys.size:
                out.append((ys, xs))
    return out


def round_solution(q, u, terms, tol=1e-6, schedule='auto'):
    """Round q (N, L, H, W) to a labelling with the schedule above.

    ``u``: unary potentials ψ (N, L, H, W); ``terms``: pairwise operators (see :mod:`pgd`);
    ``schedule``: 'auto' | 'sequential' | 'colour'.  Returns a :class:`RoundingResult`.
    """
    if schedule not in ('auto', 'sequential', 'colour'):
        raise ValueError("schedule must be 'auto', 'sequential' or 'colour', got %r" % (schedule,))
    xp = backend.get_array_module(q)
    n, L, h, w = q.shape
    self_int = any(t.has_self_interaction() for t in terms)
    feasible = is_feasible(q, tol)
    radii = [getattr(t, 'interaction_radius', None) for t in terms]
    finite = [r for r in radii if r is not None]
    unbounded = len(finite) < len(radii)
    if schedule == 'auto':
        schedule = 'colour' if (unbounded and self_int) else 'sequential'
    if schedule == 'sequential':
        radius = None if unbounded else max(finite + [0])
        exact_schedule = True
    else:
        radius = max(finite + [1])
        exact_schedule = not unbounded
    steps = colour_schedule(h, w, radius)
    labels_axis = xp.arange(L).reshape(1, L, 1)
    x = q.copy()
    for ys, xs in steps:
        ys, xs = xp.asarray(ys), xp.asarray(xs)
        grad = energy_gradient(x, u, terms)[:, :, ys, xs]               # (N, L, m) conditional energies
        lab = xp.argmin(grad, axis=1)[:, None]                          # (N, 1, m)
        x[:, :, ys, xs] = (labels_axis == lab).astype(q.dtype)
    labels = xp.argmax(x, axis=1)
    e_q = energy_eq6(q, u, terms)
    e_x = energy_eq6(x, u, terms)
    guaranteed = (not self_int) and feasible and exact_schedule
    return RoundingResult(labels, x, e_q, e_x, guaranteed, self_int, feasible, len(steps), schedule)
