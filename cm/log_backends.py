"""Where a training run's logged values go besides `progress.csv` and stdout (cm.logger, the published logger, always
on): TensorBoard and Weights & Biases, chosen with --log_backends (e.g. csv,tensorboard,wandb). Both are optional
packages (`pip install -e ".[logging]"`); one asked for and not installed is one line naming it.

- tensorboard: event files in RUN/tensorboard (torch.utils.tensorboard): every logged value as a scalar at its step,
  the evaluations' sample grids as images, the resolved config as text.
- wandb: the run RUN/wandb, its id the run's `run_id` (config.json, kept across resumes), so a resumed run continues
  the same W&B run; WANDB_MODE=offline works without an account (`wandb sync` uploads later). W&B keeps only rising
  steps: the rows a resumed run logs again (those after its last checkpoint) keep their first values there.
"""

import importlib.util
import json
import os

BACKENDS = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # name: the package it needs
WANDB_PROJECT = "consistency-models"  # (the W&B project; WANDB_PROJECT in the environment overrides it)


def parse_backends(text):
    """The backends of --log_backends besides csv (always written), each installed: one line otherwise."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown --log_backends {', '.join(unknown)}; choose from {', '.join(BACKENDS)}, "
                         "comma-separated (csv is always written)")
    missing = [BACKENDS[n] for n in names if BACKENDS[n] and importlib.util.find_spec(BACKENDS[n]) is None]
    if missing:
        raise ValueError(f"--log_backends {text} needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: "
                         f"pip install {' '.join(missing)} (or pip install -e \".[logging]\")")
    return [n for n in dict.fromkeys(names) if n != "csv"]


def open_backends(names, folder, config):
    """The backends `names` (parse_backends) writing into the run folder `folder`, given the resolved `config`."""
    opened = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend}
    return [opened[name](folder, config) for name in names]


class TensorBoardBackend:
    def __init__(self, folder, config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(folder, "tensorboard"))
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # (indented: markdown code)

    def scalars(self, row, step):
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag, image, step):
        """`image`: uint8 HWC (C 1 or 3)."""
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbBackend:
    def __init__(self, folder, config):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), dir=folder,
                              name=os.path.basename(os.path.abspath(folder)), id=config.get("run_id"), resume="allow",
                              settings=wandb.Settings(quiet=True))
        # (a resumed run may change flags that do not define it, e.g. --eval_interval: its config follows)
        self.run.config.update({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()},
                               allow_val_change=True)

    def scalars(self, row, step):
        self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=int(step))

    def image(self, tag, image, step):
        self.run.log({tag: self.wandb.Image(image)}, step=int(step))

    def close(self):
        self.run.finish()
