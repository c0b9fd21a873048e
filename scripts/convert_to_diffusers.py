"""Convert a consistency model of this project, or a published checkpoint, into a folder that
diffusers' ConsistencyModelPipeline.from_pretrained loads: unet/ (UNet2DModel weights as safetensors),
scheduler/ (CMStochasticIterativeScheduler whose num_train_timesteps is --steps), model_index.json,
and cm_flags.json (our flags and sampler settings, for an exact way back).

The architecture and method come from the config stored inside a checkpoint written by this project (a flag
that contradicts it is refused), and for a published checkpoint, which stores none, from the flags: a sampling
preset (--config sample_ct_imagenet64_onestep) and the command line. The pipeline's `timesteps` for this
model's --ts are printed at the end.

    python scripts/convert_to_diffusers.py --config sample_ct_imagenet64_multistep \\
        --model_path ct_imagenet64.pt --output_dir ct_imagenet64_diffusers
"""

import json

from cm import logger
from cm.checkpoints import load_model_weights
from cm.cli import args_to_dict, run_cli
from cm.config import given_flags, parse_args_with_config
from cm.diffusers_convert import diffusers_timesteps, save_pipeline
from cm.methods import parameterization
from cm.parameterizations import CONSISTENCY, parse_int_list
from cm.sample_util import read_sampling_weights, sampling_argparser
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def main(argv=None):
    parser = create_argparser()
    args = parse_args_with_config(parser, argv, "convert_to_diffusers.py", also=("image_sample.py",))
    if not args.model_path or not args.output_dir:
        raise ValueError("pass --model_path (the checkpoint) and --output_dir (the diffusers folder to write)")
    state = read_sampling_weights(args, given_flags(parser, argv))  # (its stored config fills the flags not given)
    if parameterization(args.training_mode) is not CONSISTENCY:
        raise ValueError(
            f"--training_mode {args.training_mode}: ConsistencyModelPipeline applies the consistency boundary "
            "condition, so only consistency models convert (pass --training_mode consistency_training or "
            "consistency_distillation, or a sample_cd_*/sample_ct_* preset)"
        )
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, _ = create_model_and_diffusion(**flags)
    load_model_weights(model, args.model_path, state)
    extra = {"training_mode": args.training_mode, "sampler": args.sampler}
    timesteps = None
    if args.sampler == "multistep" and args.ts:
        ts = parse_int_list(args.ts, "ts")
        timesteps = diffusers_timesteps(ts, args.steps)
        extra.update(ts=list(ts), diffusers_timesteps=timesteps)
    save_pipeline(model, flags, args.steps, args.output_dir, extra)
    logger.log(f"wrote {args.output_dir} (num_train_timesteps={args.steps})")
    call = f"timesteps={timesteps}" if timesteps else "num_inference_steps=1"
    logger.log(
        "load it with: from diffusers import ConsistencyModelPipeline; "
        f"pipe = ConsistencyModelPipeline.from_pretrained({json.dumps(args.output_dir)}); pipe({call})"
    )


def create_argparser():
    return sampling_argparser(__doc__, output_dir="")


if __name__ == "__main__":
    run_cli(main)
