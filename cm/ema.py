"""Exponential moving averages of weights: the sampling EMAs (several rates) and the target network.

Updates are fused over all tensors with torch._foreach_lerp_: ema <- ema + (1 - rate) (src - ema),
the same as ema * rate + src * (1 - rate); at rate 0 the lerp returns src exactly.
"""

import torch


@torch.no_grad()
def update_ema(target_params, source_params, rate=0.99):
    """target <- rate * target + (1 - rate) * source, for every pair of tensors."""
    target_params, source_params = list(target_params), list(source_params)
    if len(target_params) != len(source_params):
        raise ValueError(f"EMA over {len(target_params)} tensors cannot follow {len(source_params)} source tensors")
    torch._foreach_lerp_(target_params, [s.to(t.dtype) for s, t in zip(source_params, target_params)], 1.0 - rate)


class EMASet:
    """Float32 copies of a model's parameters, one per EMA rate."""

    def __init__(self, rates, params):
        self.rates = list(rates)
        self.params = [[p.detach().float().clone() for p in params] for _ in self.rates]

    @torch.no_grad()
    def update(self, source_params):
        source_params = list(source_params)
        for rate, ema in zip(self.rates, self.params):
            update_ema(ema, source_params, rate)

    def reset(self, params):
        """Restart every average at `params` (progressive distillation, at each new stage)."""
        self.params = [[p.detach().float().clone() for p in params] for _ in self.rates]
