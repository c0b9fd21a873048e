"""The time derivative of a network along an ODE trajectory: dF/dt = (dF/dx) dx/dt + dF/dt, one
Jacobian-vector product along the tangent (dx/dt, 1), as continuous-time consistency training needs it.

"forward": torch.func.jvp, forward-mode automatic differentiation through the whole network, in float32
(autocast off). PyTorch's fused attention kernels have no forward-mode rule (measured with torch 2.14: the CPU
flash kernel raises NotImplementedError), so attention runs through scaled_dot_product_attention's math
backend here, which has one; group norm and (non-reentrant) gradient checkpointing support forward mode.
"finite_diff": the central difference (F(x + e dx, t + e) - F(x - e dx, t - e)) / 2e, which works with every
kernel; its error is O(e^2) plus rounding of order (float eps) / e.

Both evaluate without building an autograd graph (the result is a stop-gradient target) and restore the random
state before each network evaluation, so dropout draws the same mask as the caller's own evaluation.
"""

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .nn import input_tangents_only
from .random_util import rng_states, set_rng_states

JVP_METHODS = ("forward", "finite_diff")


def network_jvp(fn, x, t, dx_dt, method="forward", eps=1e-3, value=True):
    """(fn(x, t), d fn(x, t) / dt along (dx_dt, 1)), both without gradient; with value=False the first is None, and
    finite differences spare the evaluation at (x, t) (forward mode computes it anyway)."""
    if method not in JVP_METHODS:
        raise ValueError(f"unknown --jvp {method!r}; choose one of {', '.join(JVP_METHODS)}")
    device = x.device
    states = rng_states(device)
    no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()
    with torch.no_grad(), no_autocast:
        if method == "forward":
            with sdpa_kernel(SDPBackend.MATH), input_tangents_only():
                primal, tangent = torch.func.jvp(fn, (x, t), (dx_dt, torch.ones_like(t)))
            return (primal if value else None), tangent
        primal = None
        if value:
            primal = fn(x, t)
            set_rng_states(device, states)
        plus = fn(x + eps * dx_dt, t + eps)
        set_rng_states(device, states)
        minus = fn(x - eps * dx_dt, t - eps)
        return primal, (plus - minus) / (2 * eps)
