"""Train a consistency model, or any method of cm/methods/: consistency distillation (CD) from an EDM
teacher, consistency training (CT), progressive distillation, improved consistency training (iCT,
Song & Dhariwal 2023), easy consistency tuning (ECT, Geng et al. 2024: starts from the EDM model of
--teacher_model_path), or EDM itself. Takes every flag of the published script; a method brings its
own flag values as defaults (TrainingMethod.flag_defaults), which a --config preset and the command
line override.

  mpiexec -n 8 python scripts/cm_train.py --training_mode consistency_training ... --data_dir /path/to/data
"""

import argparse

from cm import dist_util, logger
from cm.checkpoints import check_stored_flags, load_model_weights
from cm.cli import args_to_dict, run_cli
from cm.config import parse_args_with_config
from cm.diffusers_convert import read_weights
from cm.methods import method_class, mode_flag_defaults, trained_parameterization
from cm.parameterizations import DENOISER
from cm.run_setup import loop_settings, per_process_batch, start_run, training_data
from cm.script_util import (add_flags_by_owner, cm_train_defaults, create_model_and_diffusion, model_and_diffusion_defaults,
                            train_defaults)
from cm.train_util import TrainLoop
from evaluations.during_training import training_evaluation


def main(argv=None):
    args = parse_args_with_config(create_argparser(), argv, "cm_train.py", mode_defaults=mode_flag_defaults())
    method_cls = method_class(args.training_mode)
    model_kwargs = args_to_dict(args, model_and_diffusion_defaults().keys())
    model_kwargs["distillation"] = method_cls.boundary_condition
    denoiser_kwargs = dict(loss_norm=args.loss_norm, huber_c=None if args.huber_c < 0 else args.huber_c,
                           lpips_vgg_path=args.lpips_vgg_path or None)
    evaluation = training_evaluation(args, method_cls)  # (its flags checked before anything is written)
    config = start_run(args, method_cls, {**model_kwargs, **denoiser_kwargs})  # checks every flag first

    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**model_kwargs, **denoiser_kwargs)
    model.to(dist_util.dev()).train()

    batch_size = per_process_batch(args)
    data = training_data(args, batch_size)
    method = method_cls(args, diffusion)  # checks its flags (one clear error)

    def build_teacher():
        logger.log(f"loading the teacher model from {args.teacher_model_path}")
        teacher, teacher_diffusion = create_model_and_diffusion(
            **dict(model_kwargs, dropout=args.teacher_dropout, distillation=False)
        )
        path = args.teacher_model_path
        state = read_weights(path)
        trained = trained_parameterization(state)
        if trained and trained[1] is not DENOISER:  # e.g. an sCT model as sCD's teacher
            raise ValueError(f"--teacher_model_path {path} was trained as --training_mode {trained[0]}, "
                             f"{trained[1].description}; a teacher is a denoiser: pass a checkpoint of "
                             "scripts/edm_train.py (or --training_mode edm)")
        check_stored_flags(state, model_kwargs, path)
        load_model_weights(teacher, path, state, what="teacher checkpoint")
        return teacher.to(dist_util.dev()), teacher_diffusion

    method.build_networks(model, build_teacher if args.teacher_model_path else None)
    logger.log("training...")
    TrainLoop(method=method, model=model, data=data, settings=loop_settings(args, batch_size),
              config=config, evaluation=evaluation).run_loop()
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
    return add_flags_by_owner(parser, defaults)


if __name__ == "__main__":
    run_cli(main)
