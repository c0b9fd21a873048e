"""Exponential moving averages of weights: the sampling EMAs (several rates) and the target network.

Updates are fused over all tensors, and over all averages of the same source (the sampling EMAs and
the target network), in one torch._foreach_lerp_: ema <- ema + (1 - rate) (src - ema), the same as
ema * rate + src * (1 - rate); at rate 0 the lerp returns src exactly.
"""

import torch


@torch.no_grad()
def update_emas(averages, source_params):
    """params <- rate * params + (1 - rate) * source for every (params, rate) in `averages`, in one
    fused update over all their tensors."""
    source_params = list(source_params)
    targets, sources, weights = [], [], []
    for params, rate in averages:
        params = list(params)
        if len(params) != len(source_params):
            raise ValueError(f"EMA over {len(params)} tensors cannot follow {len(source_params)} source tensors")
        targets += params
        sources += [s.to(t.dtype) for s, t in zip(source_params, params)]
        weights += [1.0 - rate] * len(params)
    if targets:
        torch._foreach_lerp_(targets, sources, weights)


def update_ema(target_params, source_params, rate=0.99):
    """target <- rate * target + (1 - rate) * source, for every pair of tensors."""
    update_emas([(target_params, rate)], source_params)


class EMASet:
    """Float32 copies of a model's parameters, one per EMA rate."""

    def __init__(self, rates, params):
        self.rates = list(rates)
        self.params = [[p.detach().float().clone() for p in params] for _ in self.rates]

    def update(self, source_params, also=()):
        """Move every average one step towards `source_params`, together with the further
        (params, rate) averages in `also` (the target network), in one fused update."""
        update_emas(list(zip(self.params, self.rates)) + list(also), source_params)

    def reset(self, params):
        """Restart every average at `params` (progressive distillation, at each new stage)."""
        self.params = [[p.detach().float().clone() for p in params] for _ in self.rates]
