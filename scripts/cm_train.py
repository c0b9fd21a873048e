"""Train a consistency model: consistency distillation (CD) from an EDM teacher, consistency
training (CT), progressive distillation, improved consistency training (iCT, Song & Dhariwal 2023) or
easy consistency tuning (ECT, Geng et al. 2024: starts from the EDM model of --teacher_model_path).
Takes every flag of the published script; iCT and ECT bring their published flag values as defaults
(cm.script_util.TRAINING_MODE_DEFAULTS), which a --config preset and the command line override.

  mpiexec -n 8 python scripts/cm_train.py --training_mode consistency_training ... --data_dir /path/to/data
"""

import argparse
import copy

from cm import dist_util, logger
from cm.config import parse_args_with_config
from cm.checkpoints import load_model_weights
from cm.run_setup import loop_kwargs, per_process_batch, start_run, training_data
from cm.script_util import (
    TRAINING_MODE_DEFAULTS,
    add_dict_to_argparser,
    args_to_dict,
    cm_train_defaults,
    create_ema_and_scales_fn,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    run_cli,
    train_defaults,
)
from cm.train_util import TEACHER_MODES, CMTrainLoop, check_training_mode


def main(argv=None):
    args = parse_args_with_config(create_argparser(), argv, "cm_train.py", mode_defaults=TRAINING_MODE_DEFAULTS)
    config = start_run(args)

    ema_scale_fn = create_ema_and_scales_fn(
        target_ema_mode=args.target_ema_mode,
        start_ema=args.start_ema,
        scale_mode=args.scale_mode,
        start_scales=args.start_scales,
        end_scales=args.end_scales,
        total_steps=args.total_training_steps,
        distill_steps_per_iter=args.distill_steps_per_iter,
    )
    check_training_mode(args.training_mode)
    # consistency models use the boundary-condition scalings; progressive distillation keeps EDM's, and
    # so does ECT in training, as published (ECT's network switches to the boundary-condition scalings
    # only to sample, which our sampling scripts do for every consistency mode)
    model_kwargs = args_to_dict(args, model_and_diffusion_defaults().keys())
    model_kwargs["distillation"] = args.training_mode not in ("progdist", "easy_consistency_tuning")
    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**model_kwargs, loss_norm=args.loss_norm)
    diffusion.lpips_vgg_path = args.lpips_vgg_path or None
    diffusion.huber_c = None if args.huber_c < 0 else args.huber_c
    model.to(dist_util.dev()).train()

    batch_size = per_process_batch(args)
    data = training_data(args, batch_size)

    check_training_mode(args.training_mode, has_teacher=bool(args.teacher_model_path))
    teacher_model = teacher_diffusion = None
    if args.teacher_model_path:
        logger.log(f"loading the teacher model from {args.teacher_model_path}")
        teacher_kwargs = dict(model_kwargs, dropout=args.teacher_dropout, distillation=False)
        teacher_model, teacher_diffusion = create_model_and_diffusion(**teacher_kwargs)
        load_model_weights(teacher_model, args.teacher_model_path)
        # the student starts from the teacher's weights (as published, for every training mode; ECT's
        # fresh run starts so, a resumed one from its checkpoint)
        model.load_state_dict(teacher_model.state_dict())
        if args.training_mode in TEACHER_MODES:
            teacher_model.to(dist_util.dev()).eval()
            if args.use_fp16:
                teacher_model.convert_to_fp16()
        else:
            teacher_model = teacher_diffusion = None  # the loss runs no teacher: it only gave the start

    target_model = copy.deepcopy(model)  # the target network f^- starts as the online network
    logger.log("training...")
    CMTrainLoop(
        target_model=target_model,
        teacher_model=teacher_model,
        teacher_diffusion=teacher_diffusion,
        training_mode=args.training_mode,
        ema_scale_fn=ema_scale_fn,
        teacher_solver=args.teacher_solver,
        p_mean=args.p_mean,
        p_std=args.p_std,
        ect_q=args.ect_q,
        ect_k=args.ect_k,
        ect_b=args.ect_b,
        ect_stage_steps=args.ect_stage_steps,
        **loop_kwargs(args, model, diffusion, data, batch_size, config),
    ).run_loop()
    logger.log("training complete")


def create_argparser():
    defaults = train_defaults()
    defaults.update(model_and_diffusion_defaults())
    defaults.update(cm_train_defaults())
    defaults.update(
        teacher_solver="heun",  # CD's one ODE step with the teacher: heun (published) | euler
        lpips_vgg_path="",  # VGG-16 ImageNet weights for LPIPS (default: torchvision's cache)
    )
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_cli(main)
