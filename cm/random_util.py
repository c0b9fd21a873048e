"""Random number generators for sampling whose draws do not depend on batch size or process count.

`get_generator(kind, num_samples, seed)` gives, as published:
  "dummy"         the global torch RNG;
  "determ"        one seeded generator per device; every draw makes the noise of all `num_samples`
                  samples and keeps this process's rows (fast on GPU, memory grows with num_samples);
  "determ-indiv"  one seeded generator per sample (seed = index + num_samples * seed);
and, this project's addition, "torch": one seeded torch.Generator drawn in call order, as diffusers'
pipelines draw (the same seed gives ConsistencyModelPipeline's samples; depends on batch size).
Global sample index of row j on rank r with world size W is done_samples + r + j * W, so a batch
is a fixed set of global samples whatever the batch size and number of processes. Before each
batch, call `set_done_samples(n)` with the number of samples all processes have finished
(the published sampling script never calls it, which makes its "determ" batches depend on the
batch size; ours does).
"""

import torch
import torch.distributed as dist


def get_generator(generator, num_samples=0, seed=0, rank=None, world_size=None):
    """`rank` / `world_size` default to torch.distributed's (or 0 / 1 in a single process)."""
    if generator == "dummy":
        return DummyGenerator()
    if generator == "determ":
        return DeterministicGenerator(num_samples, seed, rank, world_size)
    if generator == "determ-indiv":
        return DeterministicIndividualGenerator(num_samples, seed, rank, world_size)
    if generator == "torch":
        return TorchGenerator(seed)
    raise ValueError(f"unknown generator {generator!r}; choose dummy, determ, determ-indiv or torch")


class DummyGenerator:
    """Draws from torch's global RNG."""

    def randn(self, *args, **kwargs):
        return torch.randn(*args, **kwargs)

    def randint(self, *args, **kwargs):
        return torch.randint(*args, **kwargs)

    def randn_like(self, *args, **kwargs):
        return torch.randn_like(*args, **kwargs)

    def set_done_samples(self, done_samples):
        pass


class TorchGenerator:
    """One torch.Generator per device, seeded with `seed`, each draw continuing the stream: diffusers'
    pipelines draw their latents and each step's noise this way from the `generator` they are given."""

    def __init__(self, seed=0):
        self.seed = seed
        self._generators = {}

    def _gen(self, device):
        key = str(torch.device("cpu" if device is None else device))
        if key not in self._generators:
            self._generators[key] = torch.Generator(key).manual_seed(self.seed)
        return self._generators[key]

    def randn(self, *size, dtype=torch.float, device="cpu"):
        return torch.randn(size, generator=self._gen(device), dtype=dtype, device=device)

    def randn_like(self, tensor):
        return self.randn(*tensor.shape, dtype=tensor.dtype, device=tensor.device)

    def randint(self, low, high, size, dtype=torch.long, device="cpu"):
        return torch.randint(low, high, size, generator=self._gen(device), dtype=dtype, device=device)

    def set_done_samples(self, done_samples):
        pass


class _SampleIndexedGenerator:
    """What the deterministic generators share: process placement and the global indices of a batch."""

    def __init__(self, num_samples, seed, rank, world_size):
        if num_samples < 1:
            raise ValueError(f"deterministic generators need num_samples >= 1, got {num_samples}")
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        self.num_samples = num_samples
        self.done_samples = 0
        self.seed = seed
        self._generators = {}  # device -> generator(s), created on first use

    def sample_indices(self, batch_size):
        """Global sample indices of this process's rows, clamped to the last sample past the end."""
        indices = torch.arange(
            self.done_samples + self.rank,
            self.done_samples + self.world_size * int(batch_size),
            self.world_size,
        )
        return torch.clamp(indices, 0, self.num_samples - 1)

    def _device_generators(self, device):
        device = torch.device("cpu" if device is None else device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = self._new_generators(device)
            self._seed_generators(self._generators[key])
        return self._generators[key]

    def randn_like(self, tensor):
        return self.randn(*tensor.size(), dtype=tensor.dtype, device=tensor.device)

    def set_seed(self, seed):
        self.seed = seed
        for gens in self._generators.values():
            self._seed_generators(gens)


class DeterministicGenerator(_SampleIndexedGenerator):
    """One generator per device; each draw is made for all num_samples samples, then subset."""

    def _new_generators(self, device):
        return torch.Generator(device)

    def _seed_generators(self, gen):
        gen.manual_seed(self.seed)

    def randn(self, *size, dtype=torch.float, device="cpu"):
        indices = self.sample_indices(size[0])
        gen = self._device_generators(device)
        full = torch.randn(self.num_samples, *size[1:], generator=gen, dtype=dtype, device=device)
        return full[indices.to(full.device)]

    def randint(self, low, high, size, dtype=torch.long, device="cpu"):
        indices = self.sample_indices(size[0])
        gen = self._device_generators(device)
        full = torch.randint(
            low, high, (self.num_samples, *size[1:]), generator=gen, dtype=dtype, device=device
        )
        return full[indices.to(full.device)]

    def set_done_samples(self, done_samples):
        """Move to the batch starting at global sample `done_samples`; the stream restarts from the seed."""
        self.done_samples = done_samples
        self.set_seed(self.seed)


class DeterministicIndividualGenerator(_SampleIndexedGenerator):
    """One generator per sample, seeded index + num_samples * seed; memory independent of num_samples
    per draw, at the cost of one small draw per sample."""

    def _new_generators(self, device):
        return [torch.Generator(device) for _ in range(self.num_samples)]

    def _seed_generators(self, gens):
        for i, gen in enumerate(gens):
            gen.manual_seed(i + self.num_samples * self.seed)

    def randn(self, *size, dtype=torch.float, device="cpu"):
        gens = self._device_generators(device)
        return torch.cat(
            [
                torch.randn(1, *size[1:], generator=gens[i], dtype=dtype, device=device)
                for i in self.sample_indices(size[0]).tolist()
            ],
            dim=0,
        )

    def randint(self, low, high, size, dtype=torch.long, device="cpu"):
        gens = self._device_generators(device)
        return torch.cat(
            [
                torch.randint(low, high, (1, *size[1:]), generator=gens[i], dtype=dtype, device=device)
                for i in self.sample_indices(size[0]).tolist()
            ],
            dim=0,
        )

    def set_done_samples(self, done_samples):
        """Move to the batch starting at global sample `done_samples` (each sample's stream continues)."""
        self.done_samples = done_samples


def rng_states(device):
    """The random state dropout draws from on `device` (CPU, plus the GPU's own when on CUDA)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_states(device, states):
    """Restore what rng_states returned: the next dropout mask repeats the one drawn after it."""
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)
