"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Section 3 and Appendix C).

A profile of exponent gamma averages the weights seen up to time t with density
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its relative standard deviation (the width of the
average as a fraction of t) is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Tracked with the
per-step rate beta = (1 - delta / t)^(gamma + 1) (delta: the time one step adds), the average gives every
step exactly the profile's mass over that step. Times are in images (or steps: every formula here is
invariant to the unit). Snapshots of two profiles at many times span the profiles in between, and of any
length: the average for another sigma_rel is a linear combination of the snapshots, by least squares over
the profiles' inner products.
"""

import functools
import math

import numpy as np


def exp_to_std(gamma):
    """sigma_rel of the profile of exponent gamma."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(std):
    """The exponent gamma of relative standard deviation `std` (0 < std < sqrt(1/12), gamma > 0): the largest
    real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s), s = std^-2 (exp_to_std solved for gamma)."""
    std = float(std)
    if not 0 < std < math.sqrt(1 / 12):
        raise ValueError(f"a power-function EMA's sigma_rel must be in (0, {math.sqrt(1 / 12):.4f}), got {std}")
    s = std**-2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def power_beta(gamma, t_next, t_delta):
    """The rate of the step that takes the tracked profile of exponent gamma from time t_next - t_delta to
    t_next (EDM2, Appendix C.1); 0 at the first step, so the average starts at the first step's weights."""
    return (1.0 - t_delta / t_next) ** (gamma + 1.0)


def profile_dot(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral of the two profiles' product (closed form; arrays broadcast)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    gamma_hi = np.where(t_a <= t_b, gamma_b, gamma_a)
    # (ga + 1)(gb + 1) lo^(ga + gb + 1) / ((ga + gb + 1) t_a^(ga + 1) t_b^(gb + 1)), written with a ratio <= 1
    return (gamma_a + 1) * (gamma_b + 1) * (lo / hi) ** gamma_hi / ((gamma_a + gamma_b + 1) * hi)


def halflife_dot(t_a, gamma_a, t_b, halflife, nodes=512):
    """<p_a, e_b>, e_b the classic EMA of half-life h = `halflife` at time t_b, of density k exp(-k (t_b - tau))
    on [0, t_b], k = ln 2 / h (the mass it leaves on the initial weights is no profile of the trained ones), by
    Gauss-Legendre quadrature over [0, min(t_a, t_b)], where both densities are smooth."""
    k = math.log(2) / halflife
    end = min(t_a, t_b)
    x, w = gauss_legendre(nodes)
    tau = (x + 1) * end / 2
    p = (gamma_a + 1) * (tau / t_a) ** gamma_a / t_a
    e = k * np.exp(-k * (t_b - tau))
    return float(np.sum(w * p * e) * end / 2)


@functools.lru_cache(maxsize=4)
def gauss_legendre(nodes):
    return np.polynomial.legendre.leggauss(nodes)


def halflife_self_dot(t, halflife):
    k = math.log(2) / halflife
    return k / 2 * -math.expm1(-2 * k * t)


def solve_weights(snap_t, snap_std, target_t, target_std=None, target_halflife=None):
    """Coefficients x (summing to 1) of the snapshots (times snap_t, profiles snap_std) whose combination
    best matches the target profile at target_t: power-function `target_std`, or a classic EMA of
    `target_halflife` (same units as the times). Returns (x, relative L2 error of the fitted profile)."""
    t = np.asarray(snap_t, dtype=np.float64)
    gamma = np.array([std_to_exp(s) for s in snap_std])
    A = profile_dot(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    if target_halflife is not None:
        b = np.array([halflife_dot(ti, gi, target_t, target_halflife) for ti, gi in zip(t, gamma)])
        c = halflife_self_dot(target_t, target_halflife)
    else:
        g = std_to_exp(target_std)
        b = profile_dot(t, gamma, target_t, g)
        c = float(profile_dot(target_t, g, target_t, g))
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    x = x / x.sum()
    residual = max(float(x @ A @ x - 2 * x @ b + c), 0.0)
    return x, math.sqrt(residual / c) if c > 0 else math.inf  # (c = 0: a target of no mass after time 0)
