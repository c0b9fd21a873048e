import os
import pytest
import torch

from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)  # (two workers: a core each)


def tiny_config(**overrides):
    """A 16x16 U-Net with every structural feature of the published ones (attention, class
    embedding, scale-shift norm, residual up/down), small enough for CPU tests."""
    cfg = model_and_diffusion_defaults()
    cfg.update(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="8",
        num_head_channels=16,
        class_cond=True,
        num_classes=10,
        resblock_updown=True,
        use_scale_shift_norm=True,
    )
    cfg.update(overrides)
    return cfg


def randomize(model, std=0.05, seed=0):
    """Give every parameter random values (zero-initialised output layers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def tiny_model_and_diffusion():
    model, diffusion = create_model_and_diffusion(**tiny_config(), distillation=True)
    return randomize(model).eval(), diffusion


@pytest.fixture
def batch():
    """Images in [-1, 1], noise and labels for the loss tests, in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    z = torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    return x, z, torch.tensor([1, 4, 7])


@pytest.fixture(scope="session")
def edm_teacher(tmp_path_factory):
    """A 30-step EDM model of the tiny U-Net on the digits (the teacher of the CD, progdist and sCD tests)."""
    from test_training import TRAIN, train  # (test modules import this file first)

    out = tmp_path_factory.mktemp("edm")
    train("edm_train", TRAIN + " --schedule_sampler lognormal --total_training_steps 30 --log_interval 1 "
          "--save_interval 30 --weight_schedule karras --lr 5e-4", out)
    return out
