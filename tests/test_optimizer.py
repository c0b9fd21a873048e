"""The loop's optimizer settings: Adam or RAdam with their betas and eps, EDM2's inverse-square-root decay,
gradient clipping (sCM's recipes use all of them)."""

import math
import shlex

import pytest
import torch

from cm.train_util import Precision, inverse_sqrt_decay, linear_warmup

from test_scripts import load_script
from test_training import TRAIN, run_in_process

CT = "--training_mode consistency_training --start_scales 4 --end_scales 8 --loss_norm l2"


def test_inverse_sqrt_decay_is_one_until_t_ref_then_falls_as_one_over_the_root():
    assert [inverse_sqrt_decay(s, 100) for s in (0, 50, 100)] == [1.0, 1.0, 1.0]
    assert inverse_sqrt_decay(400, 100) == pytest.approx(0.5)
    assert inverse_sqrt_decay(300, 100) == pytest.approx(1 / math.sqrt(3))
    assert inverse_sqrt_decay(10**6, 0) == 1.0  # off
    # EDM2's ramp-up: from 0 at step 0 to 1 at the warmup's end (its rampup_Mimg), 1 when off
    assert [linear_warmup(s, 4) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0] and linear_warmup(0, 0) == 1.0


@pytest.mark.parametrize("clip", [0.0, 0.5, 100.0])
def test_clipping_scales_the_step_as_torch_clip_grad_norm_does(clip):
    torch.manual_seed(0)
    ours, reference = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(8, 4)
    for net in (ours, reference):
        (net(x) ** 2).sum().backward()
    norm_before = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip if clip > 0 else float("inf"))
    torch.optim.SGD(reference.parameters(), lr=1.0).step()
    took, norm = Precision(ours).optimize(torch.optim.SGD(ours.parameters(), lr=1.0), clip)
    assert took and norm.item() == pytest.approx(norm_before.item())  # the logged norm is the one before clipping
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adam_with_its_betas_eps_decay_and_clipping_reaches_the_optimizer(tmp_path):
    flags = (TRAIN + " " + CT + " --total_training_steps 3 --save_interval 3 --log_interval 1 --optimizer adam "
             "--adam_betas 0.9,0.99 --adam_eps 1e-11 --lr_ref_steps 2 --lr_warmup_steps 4 --grad_clip 0.5")
    load_script("cm_train").main([*shlex.split(flags), "--log_dir", str(tmp_path)])
    group = torch.load(tmp_path / "opt000003.pt", weights_only=True)["param_groups"][0]
    assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-11 and "amsgrad" in group  # Adam's, not RAdam's
    assert group["lr"] == pytest.approx(2e-4 / math.sqrt(3 / 2) * 3 / 4)  # after step 3: EDM2's decay from 2, ramp-up to 4


@pytest.mark.parametrize("extra, message", [
    ("--optimizer sgd", "--optimizer"),
    ("--adam_betas 0.9", "--adam_betas"),
    ("--adam_betas 0.9,1.5", "--adam_betas"),
    ("--adam_eps 0", "--adam_eps"),
    ("--grad_clip -1", "--grad_clip"),
])
def test_bad_optimizer_flags_get_one_line(extra, message, tmp_path, monkeypatch, capsys):
    flags = TRAIN + " " + CT + " --total_training_steps 1 " + extra
    result = run_in_process("cm_train", [*shlex.split(flags), "--log_dir", str(tmp_path)], monkeypatch, capsys)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
