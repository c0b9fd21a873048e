"""Deterministic generators: the published random numbers, independent of batch size and process count."""

import pytest
import torch

from cm.karras_diffusion import karras_sample
from cm.random_util import get_generator


def test_determ_draws_the_published_numbers():
    # published: one generator seeded `seed`, draw (num_samples, ...) and keep this batch's rows
    gen = get_generator("determ", num_samples=10, seed=5)
    gen.set_done_samples(4)
    got = gen.randn(3, 2, 2)
    ref = torch.Generator().manual_seed(5)
    torch.testing.assert_close(got, torch.randn(10, 2, 2, generator=ref)[4:7], rtol=0, atol=0)


def test_determ_indiv_draws_the_published_numbers():
    # published: sample i has its own generator seeded i + num_samples * seed
    gen = get_generator("determ-indiv", num_samples=10, seed=2)
    gen.set_done_samples(3)
    first, second = gen.randn(2, 4), gen.randn(2, 4)
    for row, i in enumerate((3, 4)):
        ref = torch.Generator().manual_seed(i + 10 * 2)
        torch.testing.assert_close(first[row], torch.randn(1, 4, generator=ref)[0], rtol=0, atol=0)
        torch.testing.assert_close(second[row], torch.randn(1, 4, generator=ref)[0], rtol=0, atol=0)


def _sample_all(model, diffusion, kind, num_samples, batch_size, world_size=1):
    """Draw num_samples through karras_sample (multistep: several draws per batch) as `world_size`
    simulated ranks would, and put the rows back in global sample order."""
    gens = [get_generator(kind, num_samples, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    rows = {}
    done = 0
    while done < num_samples:
        per_rank = min(batch_size, -(-(num_samples - done) // world_size))
        for r, gen in enumerate(gens):
            gen.set_done_samples(done)
            labels = gen.randint(0, 10, (per_rank,))
            out = karras_sample(
                diffusion, model, (per_rank, 3, 16, 16), steps=6, sampler="multistep", ts=(0, 3, 5),
                model_kwargs={"y": labels}, generator=gen,
            )
            for j in range(per_rank):
                index = done + r + j * world_size
                if index < num_samples:
                    rows[index] = (out[j], labels[j])
        done += per_rank * world_size
    return torch.stack([rows[i][0] for i in range(num_samples)]), torch.stack([rows[i][1] for i in range(num_samples)])


@pytest.mark.parametrize("kind", ["determ", "determ-indiv"])
def test_samples_do_not_depend_on_batch_size_or_ranks(tiny_model_and_diffusion, kind):
    model, diffusion = tiny_model_and_diffusion
    ref_x, ref_y = _sample_all(model, diffusion, kind, 8, batch_size=8)
    for batch_size, world in [(1, 1), (3, 1), (2, 2), (3, 2)]:
        x, y = _sample_all(model, diffusion, kind, 8, batch_size=batch_size, world_size=world)
        assert torch.equal(y, ref_y), (batch_size, world)
        torch.testing.assert_close(x, ref_x, rtol=0, atol=1e-6, msg=f"batch {batch_size}, ranks {world}")
    # and the samples are not all the same
    assert ref_x[0].ne(ref_x[1]).any()


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="determ-indiv"):
        get_generator("bogus")
    with pytest.raises(ValueError, match="num_samples"):
        get_generator("determ", num_samples=0)
