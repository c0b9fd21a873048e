"""Presets: every published launch line equals its preset (plus the paths the user supplies)."""

import json
import os
import re
import shlex
import subprocess

import pytest

from cm.config import load_preset, parse_args_with_config, preset_names

from test_scripts import ROOT, load_script

IM = ("--attention_resolutions 32,16,8 --class_cond True --use_scale_shift_norm True --image_size 64 --num_channels 192 "
      "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_fp16 True")
LS = ("--attention_resolutions 32,16,8 --class_cond False --use_scale_shift_norm False --image_size 256 --num_channels 256 "
      "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True")
CD = ("--training_mode consistency_distillation --target_ema_mode fixed --start_ema 0.95 --scale_mode fixed --start_scales 40 "
      "--total_training_steps 600000 --lr_anneal_steps 0 --dropout 0.0 --teacher_dropout 0.1 --schedule_sampler uniform "
      "--weight_decay 0.0 --weight_schedule uniform")
CT = ("--training_mode consistency_training --target_ema_mode adaptive --start_ema 0.95 --scale_mode progressive --start_scales 2 "
      "--lr_anneal_steps 0 --dropout 0.0 --teacher_dropout 0.1 --schedule_sampler uniform --weight_decay 0.0 --weight_schedule uniform")
IM_EMA, LS_EMA = "--ema_rate 0.999,0.9999,0.9999432189950708", "--ema_rate 0.9999,0.99994,0.9999432189950708"

# (preset, script, the published launch.sh line's flags, the paths a user adds)
TRAINING = [
    ("edm_imagenet64", "edm_train", f"{IM} --dropout 0.1 {IM_EMA} --global_batch_size 4096 --lr 0.0001 --schedule_sampler lognormal --weight_decay 0.0 --weight_schedule karras", "--data_dir /d"),
    ("cd_l2_imagenet64", "cm_train", f"{CD} {IM} --loss_norm l2 {IM_EMA} --global_batch_size 2048 --lr 0.000008", "--teacher_model_path /t.pt --data_dir /d"),
    ("cd_lpips_imagenet64", "cm_train", f"{CD} {IM} --loss_norm lpips {IM_EMA} --global_batch_size 2048 --lr 0.000008", "--teacher_model_path /t.pt --data_dir /d"),
    ("cd_l2_bedroom256", "cm_train", f"{CD} {LS} --sigma_max 80 --sigma_min 0.002 --loss_norm l2 {LS_EMA} --global_batch_size 256 --lr 0.00001", "--teacher_model_path /t.pt --data_dir /d"),
    ("cd_lpips_bedroom256", "cm_train", f"{CD} {LS} --sigma_max 80 --sigma_min 0.002 --loss_norm lpips {LS_EMA} --global_batch_size 256 --lr 0.00001", "--teacher_model_path /t.pt --data_dir /d"),
    ("ct_imagenet64", "cm_train", f"{CT} {IM} --end_scales 200 --total_training_steps 800000 --loss_norm lpips {IM_EMA} --global_batch_size 2048 --lr 0.0001", "--data_dir /d"),
    ("ct_bedroom256", "cm_train", f"{CT} {LS} --sigma_max 80 --sigma_min 0.002 --end_scales 150 --total_training_steps 1000000 --loss_norm lpips {LS_EMA} --global_batch_size 256 --lr 0.00005", "--data_dir /d"),
]

SAMPLING = [
    ("sample_cd_lpips_imagenet64_multistep", "--batch_size 256 --sampler multistep --ts 0,22,39 --steps 40 " + IM),
    ("sample_ct_imagenet64_multistep", "--batch_size 256 --sampler multistep --ts 0,106,200 --steps 201 " + IM),
    ("sample_cd_l2_bedroom256_multistep", "--batch_size 32 --sampler multistep --ts 0,18,39 --steps 40 " + LS),
    ("sample_ct_cat256_multistep", "--batch_size 32 --sampler multistep --ts 0,62,150 --steps 151 " + LS),
    ("sample_ct_bedroom256_onestep", "--batch_size 32 --generator determ-indiv --sampler onestep " + LS),
    ("sample_edm_imagenet64_heun", "--training_mode edm --batch_size 64 --sigma_max 80 --sigma_min 0.002 --s_churn 0 --steps 40 --sampler heun " + IM),
]


def parse(script, argv):
    args = vars(parse_args_with_config(load_script(script).create_argparser(), argv, f"{script}.py"))
    args.pop("config")
    return args


@pytest.mark.parametrize("preset,script,line,paths", TRAINING, ids=[t[0] for t in TRAINING])
def test_training_presets_equal_the_published_lines(preset, script, line, paths):
    assert parse(script, shlex.split(f"--config {preset} {paths}")) == parse(script, shlex.split(f"{line} {paths}"))


@pytest.mark.parametrize("preset,line", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_sampling_presets_carry_the_published_settings(preset, line):
    from_preset = parse("image_sample", ["--config", preset])
    published = parse("image_sample", shlex.split(line))
    keys = [a[2:] for a in shlex.split(line) if a.startswith("--")]
    assert {k: from_preset[k] for k in keys} == {k: published[k] for k in keys}


def test_every_preset_parses_for_its_script():
    names = preset_names()
    assert len(names) >= 42
    for name in names:
        script = load_preset(name)["script"][: -len(".py")]
        parse(script, ["--config", name])


def test_command_line_overrides_the_preset_and_errors_are_clear(tmp_path):
    assert parse("cm_train", ["--config", "ct_imagenet64", "--lr", "0.5"])["lr"] == 0.5
    with pytest.raises(ValueError, match="unknown preset 'nope'.*ct_imagenet64"):
        parse("cm_train", ["--config", "nope"])
    with pytest.raises(ValueError, match="is for scripts/image_sample.py"):
        parse("cm_train", ["--config", "sample_ct_imagenet64_onestep"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"script": "cm_train.py", "flags": {"no_such_flag": 1}}))
    with pytest.raises(ValueError, match="no_such_flag"):
        parse("cm_train", ["--config", str(bad)])


def evil_preset(tmp_path):
    """A preset outside configs/ whose script lies outside scripts/ (it would leave a marker file if run)."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil_script.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\n")
    script = os.path.relpath(evil, os.path.join(ROOT, "scripts"))
    preset = tmp_path / "x.json"
    preset.write_text(json.dumps({"script": script, "flags": {}}))
    return preset, script, marker


def test_launch_refuses_a_preset_name_with_a_path_before_running_anything(tmp_path):
    preset, _, marker = evil_preset(tmp_path)
    name = os.path.relpath(preset, os.path.join(ROOT, "configs"))[: -len(".json")]  # configs/NAME.json is the preset
    result = subprocess.run(["bash", "launch.sh", name], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and not marker.exists() and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"unknown preset {name!r}; choose one of: " in result.stderr and "ct_imagenet64" in result.stderr


def test_a_preset_is_a_name_in_configs_and_its_script_one_of_scripts(tmp_path):
    preset, script, _ = evil_preset(tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(preset))}: its script {script!r} is not one of scripts/\*\.py: .*cm_train\.py"):
        load_preset(str(preset))
    name = os.path.relpath(preset, os.path.join(ROOT, "configs"))[: -len(".json")]
    with pytest.raises(ValueError, match=r"unknown preset .*; choose one of: .*ct_imagenet64"):
        parse("cm_train", ["--config", name])
    assert load_preset("base/imagenet64")["flags"]["image_size"] == 64  # a base is still a name in configs/


def test_a_preset_takes_its_base_flags_under_its_own(tmp_path):
    base = tmp_path / "arch.json"
    base.write_text(json.dumps({"flags": {"num_channels": 64, "image_size": 32, "lr": 1.0}}))
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"script": "cm_train.py", "base": str(base), "flags": {"lr": 0.5}}))
    args = parse("cm_train", ["--config", str(child), "--image_size", "16"])
    assert (args["num_channels"], args["lr"], args["image_size"]) == (64, 0.5, 16)  # base < preset < command line
    base.write_text(json.dumps({"base": str(child), "flags": {}}))
    with pytest.raises(ValueError, match="bases form a loop"):
        load_preset(str(child))
    # the published architectures are written once each, and base presets are not listed as runnable
    assert load_preset("ct_imagenet64")["base"] == load_preset("sample_cd_l2_imagenet64_onestep")["base"] == "base/imagenet64"
    assert not any(name.startswith("base") for name in preset_names())


def test_the_scm_recipes_name_the_source_of_every_value():
    for name in ("scd_imagenet64", "sct_cifar10_32", "sample_scd_imagenet64_twostep", "sample_sct_cifar10_32_twostep",
                 "tcm_cifar10_32", "tcm_imagenet64", "sample_tcm_cifar10_32_onestep", "sample_tcm_cifar10_32_twostep"):
        with open(os.path.join(ROOT, "configs", f"{name}.json")) as f:
            preset = json.load(f)
        assert set(preset["sources"]) == set(preset["flags"]), name
        assert all(len(source) > 3 for source in preset["sources"].values()), name
    args = parse("cm_train", ["--config", "scd_imagenet64"])
    assert (args["optimizer"], args["adam_eps"], args["lr_ref_steps"], args["use_fp16"]) == ("adam", 1e-11, 35000, False)
