"""Train an EDM diffusion model (the teacher of consistency distillation). Takes every flag of the
published script, plus --total_training_steps (0: until lr_anneal_steps, or until stopped, as published).

  mpiexec -n 8 python scripts/edm_train.py --schedule_sampler lognormal ... --data_dir /path/to/imagenet
"""

import argparse

from cm import dist_util, logger
from cm.cli import args_to_dict, run_cli
from cm.config import parse_args_with_config
from cm.methods import EDM
from cm.run_setup import loop_settings, per_process_batch, start_run, training_data
from cm.script_util import add_flags_by_owner, create_model_and_diffusion, model_and_diffusion_defaults, train_defaults
from cm.train_util import TrainLoop
from evaluations.during_training import training_evaluation


def main(argv=None):
    args = parse_args_with_config(create_argparser(), argv, "edm_train.py")
    model_kwargs = args_to_dict(args, model_and_diffusion_defaults().keys())
    evaluation = training_evaluation(args, EDM)  # (its flags checked before anything is written)
    config = start_run(args, EDM, model_kwargs)  # checks every flag first
    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**model_kwargs)
    model.to(dist_util.dev()).train()
    batch_size = per_process_batch(args)
    data = training_data(args, batch_size)
    logger.log("training...")
    TrainLoop(method=EDM(args, diffusion), model=model, data=data, settings=loop_settings(args, batch_size),
              config=config, evaluation=evaluation).run_loop()
    logger.log("training complete")


def create_argparser():
    defaults = train_defaults()
    defaults.update(model_and_diffusion_defaults())
    defaults.update(total_training_steps=0)  # stop after this many steps (0: no limit but lr_anneal_steps)
    defaults.update({flag: default for flag, (default, _) in EDM.flags.items()})  # the method's own (its lognormal)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_flags_by_owner(parser, defaults)


if __name__ == "__main__":
    run_cli(main)
