"""EDM2's network (cm/networks/edm2.py): each magnitude-preserving layer keeps unit magnitude (measured), forced weight
normalisation, the parameter counts of every published configuration, the output against NVlabs' code on random
weights, and EDM training of it (with its uncertainty head) through the ordinary method."""

import os
import shlex

import pytest
import torch

from cm.denoiser import Denoiser
from cm.networks import build_network
from cm.networks.edm2 import CONFIGS, MPConv, MPFourier, config_flags, mp_cat, mp_silu, mp_sum, normalize

from test_scripts import load_script
from test_scripts import TINY_FLAGS

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "edm2_tiny_nvlabs.pt")
# made with NVlabs/edm2 training/networks_edm2.py: its Precond(img_resolution=16, img_channels=3, label_dim=10,
# use_fp16=False, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=4)
# loaded strictly with the state dict stored beside its inputs and outputs (D_x and logvar, eval mode)
TINY = dict(image_size=16, image_channels=3, num_channels=8, channel_mult="1,2", num_res_blocks=1, attention_resolutions="8",
            class_cond=True, num_classes=10, edm2_channels_per_head=4, dropout=0.0)

# the parameters of NVlabs' Precond in each published configuration (label_dim 1000, 64x64), counted from its code
NVLABS_PARAMETERS = {
    "img512-xs": 124713253, "img512-s": 280212837, "img512-m": 497807781, "img512-l": 777498085,
    "img512-xl": 1119283749, "img512-xxl": 1523164773,
    "img64-s": 280209381, "img64-m": 497803173, "img64-l": 777492325, "img64-xl": 1119276837,
}


def rms(x):
    return x.double().pow(2).mean().sqrt().item()


def test_each_magnitude_preserving_layer_keeps_unit_magnitude():
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(4096, 256, generator=gen) for _ in range(2))
    assert rms(mp_silu(a)) == pytest.approx(1.0, abs=0.01)
    for t in (0.3, 0.5, 0.8):
        assert rms(mp_sum(a, b, t)) == pytest.approx(1.0, abs=0.01)
        assert rms(mp_cat(a[:, :64], b, dim=1, t=t)) == pytest.approx(1.0, abs=0.01)
        joined = mp_cat(a[:, :64], b, dim=1, t=t)  # the parts' energies (1 - t)^2 : t^2, whatever their widths
        energy_a, energy_b = 64 * rms(joined[:, :64]) ** 2, 256 * rms(joined[:, 64:]) ** 2
        assert energy_a / energy_b == pytest.approx((1 - t) ** 2 / t**2, rel=0.02)
    assert rms(MPFourier(512)(torch.randn(2048, generator=gen))) == pytest.approx(1.0, abs=0.03)
    x = torch.randn(64, 128, 8, 8, generator=gen)
    assert rms(MPConv(128, 96, kernel=[3, 3])(x)[:, :, 1:-1, 1:-1]) == pytest.approx(1.0, abs=0.03)  # (away from the padding)
    assert rms(MPConv(128, 96, kernel=[])(a[:, :128])) == pytest.approx(1.0, abs=0.03)
    rows = normalize(torch.randn(5, 3, 4, 4, generator=gen) * 7)
    torch.testing.assert_close(rows.pow(2).mean(dim=(1, 2, 3)), torch.ones(5), atol=1e-3, rtol=0)


def test_forced_weight_normalisation_renormalises_the_stored_weights_only_when_training():
    conv = MPConv(16, 8, kernel=[3, 3])
    with torch.no_grad():
        conv.weight.mul_(5.0)
    x = torch.randn(2, 16, 4, 4)
    before = conv.weight.detach().clone()
    with torch.no_grad():
        conv.train()(x)  # no gradient (a JVP's or a target's pass): the stored weights stay
    conv.eval()(x)
    assert torch.equal(conv.weight, before)
    out = conv.train()(x)  # a training forward: each output channel's weights back to unit magnitude
    torch.testing.assert_close(conv.weight.detach().pow(2).mean(dim=(1, 2, 3)), torch.ones(8), atol=1e-3, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(out, conv.eval()(x))  # the output does not depend on the stored norm


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_published_configuration_has_nvlabs_parameter_count(name):
    with torch.device("meta"):
        model = build_network("edm2", config_flags(name))
    assert sum(p.numel() for p in model.parameters()) == NVLABS_PARAMETERS[name]


def test_the_output_and_uncertainty_equal_nvlabs_code_on_random_weights():
    fixture = torch.load(FIXTURE, weights_only=True)
    model = build_network("edm2", TINY)
    model.load_state_dict(fixture["state_dict"], strict=True)  # NVlabs' names, loaded strictly both ways
    model.eval()
    with torch.no_grad():
        _, denoised = Denoiser(sigma_data=0.5, c_noise="edm").denoise(model, fixture["x"], fixture["sigma"],
                                                                      y=fixture["labels"])
        logvar = model.logvar(torch.log(fixture["sigma"]) / 4)
    torch.testing.assert_close(denoised, fixture["denoised"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logvar, fixture["logvar"], rtol=1e-5, atol=1e-6)


EDM2_FLAGS = (TINY_FLAGS + " --network edm2 --num_channels 16 --channel_mult 1,2 --num_res_blocks 1 "
              "--attention_resolutions 8 --edm2_channels_per_head 8 --c_noise edm --data_dir digits --global_batch_size 16 "
              "--progress False --save_interval 6 --log_interval 3")


def test_edm_trains_an_edm2_network_with_its_uncertainty_weighting(tmp_path):
    from cm.checkpoints import checkpoint_config

    load_script("edm_train").main(shlex.split(EDM2_FLAGS + " --lr 1e-2 --edm_p_mean -0.8 --edm_p_std 1.6 "
                                              f"--total_training_steps 6 --log_dir {tmp_path}"))
    state = torch.load(tmp_path / "model000006.pt", weights_only=True)
    assert checkpoint_config(state)["network"] == "edm2"
    assert state["unet.out_gain"] != 0 and state["logvar_linear.weight"].abs().sum() > 0  # both learned
    lines = (tmp_path / "progress.csv").read_text().splitlines()
    assert "logvar" in lines[0].split(",")
    samples = tmp_path / "samples"
    load_script("image_sample").main(shlex.split(f"--precision fp32 --sampler heun --steps 3 --num_samples 2 --batch_size 2 "
                                                 f"--model_path {tmp_path / 'model000006.pt'} --log_dir {samples}"))
    assert (samples / "samples_2x16x16x3.npz").exists()


def test_a_consistency_method_trains_an_edm2_network(tmp_path):
    load_script("cm_train").main(shlex.split(
        EDM2_FLAGS + " --training_mode consistency_training --scale_mode fixed --start_scales 10 --loss_norm l2 "
        f"--target_ema_mode fixed --start_ema 0.9 --total_training_steps 3 --save_interval 3 --log_dir {tmp_path}"))
    assert (tmp_path / "target_model000003.pt").exists()


NVLABS_CLASS = {"EDM2": "Precond", "UNet": "UNet", "Block": "Block", "MPConv": "MPConv", "MPFourier": "MPFourier"}


def pickle_like_nvlabs(model, path, kwargs, module_src):
    """A pickle made as NVlabs' training loop makes one: a dnnlib.EasyDict whose "ema" is a Precond built of
    torch_utils.persistence classes, each object reduced to _reconstruct_persistent_obj(meta) with its module's source
    code (here `module_src`) and its state; the two NVlabs modules it names are faked for the pickler only."""
    import pickle
    import sys
    import types

    persistence = types.ModuleType("torch_utils.persistence")
    dnnlib_util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called when reading")

    class EasyDict(dict):
        pass

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    EasyDict.__module__, EasyDict.__qualname__ = dnnlib_util.__name__, "EasyDict"
    dnnlib_util.EasyDict = EasyDict
    plain = (bool, int, float, str, type(None), dict, set, list, tuple)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            name = NVLABS_CLASS.get(type(obj).__name__)
            if name is None:
                return NotImplemented
            state = {k: v for k, v in vars(obj).items() if isinstance(v, plain)}
            if name == "Precond":
                state.update(_init_args=(), _init_kwargs=kwargs)
            meta = dict(type="class", version=6, module_src=module_src, class_name=name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    packages = {"torch_utils": types.ModuleType("torch_utils"), "dnnlib": types.ModuleType("dnnlib")}
    packages["torch_utils"].persistence, packages["dnnlib"].util = persistence, dnnlib_util
    fakes = {**packages, persistence.__name__: persistence, dnnlib_util.__name__: dnnlib_util}
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)
    try:
        with open(path, "wb") as f:
            Pickler(f, protocol=4).dump(EasyDict(dataset_kwargs={"path": "imagenet"}, ema=model))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k)
            else:
                sys.modules[k] = v


NVLABS_TINY_KWARGS = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=True, model_channels=8,
                          channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=4, dropout=0.0)


def test_an_nvlabs_network_pickle_loads_without_running_its_code(tmp_path, monkeypatch):
    from cm.checkpoints import checkpoint_config
    from cm.diffusers_convert import read_weights

    monkeypatch.chdir(tmp_path)
    fixture = torch.load(FIXTURE, weights_only=True)
    model = build_network("edm2", TINY)
    model.load_state_dict(fixture["state_dict"])
    evil = "open('ran_the_embedded_code', 'w').close()\nimport os\nos.system('touch ran_a_shell')\n"
    pickle_like_nvlabs(model.eval().requires_grad_(False), tmp_path / "net.pkl", NVLABS_TINY_KWARGS, evil)

    state = read_weights(str(tmp_path / "net.pkl"))
    assert not (tmp_path / "ran_the_embedded_code").exists() and not (tmp_path / "ran_a_shell").exists()
    config = checkpoint_config(state)
    assert (config["network"], config["training_mode"], config["c_noise"]) == ("edm2", "edm", "edm")
    loaded = build_network("edm2", config)
    loaded.load_state_dict(state, strict=True)
    with torch.no_grad():
        _, denoised = Denoiser(sigma_data=0.5, c_noise="edm").denoise(loaded.eval(), fixture["x"], fixture["sigma"],
                                                                      y=fixture["labels"])
    torch.testing.assert_close(denoised, fixture["denoised"], rtol=1e-5, atol=1e-6)

    unknown = dict(NVLABS_TINY_KWARGS, clip_act=128)
    pickle_like_nvlabs(model, tmp_path / "other.pkl", unknown, "")
    with pytest.raises(ValueError, match="clip_act=128, which cm/networks/edm2.py does not build"):
        read_weights(str(tmp_path / "other.pkl"))


def test_a_pickle_that_would_run_a_command_is_refused_in_one_line(tmp_path, monkeypatch):
    import os
    import pickle

    from cm.safe_pickle import safe_load

    monkeypatch.chdir(tmp_path)

    class Command:
        def __reduce__(self):
            return os.system, ("touch ran_a_shell",)

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"ema": Command()}, f)
    with pytest.raises(ValueError, match=r"evil.pkl: refused: the pickle asks for (posix|os)\.system"):
        safe_load(tmp_path / "evil.pkl")
    assert not (tmp_path / "ran_a_shell").exists()


def test_a_published_name_offline_is_one_line_naming_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    from cm.diffusers_convert import read_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, path, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as err:
        read_weights("edm2-img64-s-fid")
    message = str(err.value)
    assert "edm2-img64-s-1073741-0.075.pkl" in message and str(tmp_path) in message and "\n" not in message


EDM2_PRESETS = {"edm2_img512_s": "edm_train", "edm2_img512_xxl": "edm_train", "edm2_img64_s": "edm_train",
                "scd_edm2_img512_s": "cm_train", "scd_edm2_img512_xxl": "cm_train", "sct_edm2_img64_s": "cm_train",
                "ect_edm2_img64_s": "cm_train"}
# sCT's EDM2-S: NVlabs' count plus a shift per channel of every block's embedding layer (double normalisation doubles
# emb_linear's outputs: 13,713,408 more weights; the positional embedding holds no parameters, as the Fourier one)
SCT_EDM2_S_PARAMETERS = 293922789


@pytest.mark.parametrize("preset", sorted(EDM2_PRESETS))
def test_the_edm2_presets_parse_and_build_their_networks_on_the_meta_device(preset):
    from cm import methods
    from cm.config import load_preset, parse_args_with_config
    from cm.script_util import model_and_diffusion_defaults

    script = EDM2_PRESETS[preset]
    args = parse_args_with_config(load_script(script).create_argparser(), ["--config", preset], f"{script}.py",
                                  mode_defaults=methods.mode_flag_defaults() if script == "cm_train" else None)
    assert args.network == "edm2"
    with torch.device("meta"):
        model = build_network("edm2", {k: getattr(args, k) for k in model_and_diffusion_defaults()})
    count = sum(p.numel() for p in model.parameters())
    config = load_preset(preset)["base"].split("edm2_")[1].replace("_", "-")
    assert count == (SCT_EDM2_S_PARAMETERS if preset == "sct_edm2_img64_s" else NVLABS_PARAMETERS[config]), count
    if preset == "sct_edm2_img64_s":
        with torch.device("meta"):
            plain = build_network("edm2", config_flags("img64-s"))
        shifts = sum(p.numel() for name, p in plain.named_parameters() if "emb_linear" in name)
        assert count == NVLABS_PARAMETERS["img64-s"] + shifts


def test_sct_trains_an_edm2_network_with_the_scm_switches_and_scd_distils_an_nvlabs_pickle(tmp_path):
    """sCT on an EDM2 network changed as sCM changes it (identity time input, positional embedding, double
    normalisation); sCD of an EDM2 network pickled as NVlabs pickles theirs, read by path as the teacher."""
    main = load_script("cm_train").main
    tiny = (TINY_FLAGS + " --network edm2 --num_channels 8 --channel_mult 1,2 --num_res_blocks 1 --attention_resolutions 8 "
            "--edm2_channels_per_head 4 --c_noise edm --data_dir digits --global_batch_size 8 --progress False "
            "--total_training_steps 2 --save_interval 2 --tangent_warmup_steps 1")
    main(shlex.split(tiny + " --training_mode continuous_consistency_training --time_input identity --double_norm True "
                     f"--edm2_time_embedding positional --log_dir {tmp_path / 'sct'}"))
    state = torch.load(tmp_path / "sct" / "model000002.pt", weights_only=True)
    assert state["unet.enc.16x16_block0.emb_linear.weight"].shape[0] == 16  # scale and shift: twice the channels
    assert "unet.emb_fourier.freqs" not in state  # (the positional embedding has no buffers)

    fixture = torch.load(FIXTURE, weights_only=True)
    teacher = build_network("edm2", TINY)
    teacher.load_state_dict(fixture["state_dict"])
    pickle_like_nvlabs(teacher.eval(), tmp_path / "teacher.pkl", NVLABS_TINY_KWARGS, "")
    main(shlex.split(tiny + f" --training_mode continuous_consistency_distillation --teacher_model_path {tmp_path / 'teacher.pkl'} "
                     f"--log_dir {tmp_path / 'scd'}"))
    student = torch.load(tmp_path / "scd" / "model000002.pt", weights_only=True)
    moved = (student["unet.out_conv.weight"] - fixture["state_dict"]["unet.out_conv.weight"]).abs().max()
    assert 0 < moved < 1  # started from the teacher's weights, then trained
