"""Networks by their --network name (default adm, the U-Net of the published checkpoints).

A network is a torch module called as `net(x, timesteps, y=None)`: x [N x C x H x W], timesteps [N] (or [N x K]
for a network conditioned on K times, as a flow map's (t, t - r)), y [N] labels given if and only if it is
class-conditional (with a flag `null_class` True, y = num_classes means no class: classifier-free guidance); it
returns x's shape. It is built from a dict of its own keyword arguments, which are also its
flags: each declared once with a default and a one-line help, taken by every script that builds a model
(cm.script_util.model_and_diffusion_defaults) and stored in every checkpoint's config. Under --precision fp16 or
bf16 the scripts call its convert_to_fp16() / convert_to_bf16().

Adding a network: one module here with its class and FLAGS, and one line below (or register() from your own
code, as tests/test_networks.py does).
"""

from collections import namedtuple

from . import adm, dit, edm2

Flag = namedtuple("Flag", "default help")
Network = namedtuple("Network", "build flags ranges")  # build(**own flags) -> module; flags {name: Flag}; ranges

NETWORKS = {}


def register(name, build, flags, ranges=None):
    """Make `build` (a class, or a function returning a module, taking the network's own keyword arguments) the
    network --network `name`; `flags` {flag: (default, one-line help)} are those arguments, `ranges` {flag: (test,
    words)} (cm.cli.POSITIVE, ...) those of its number flags that have one. A flag that another network declares too
    must have its default (the parsers hold one)."""
    flags = {k: Flag(*v) for k, v in flags.items()}
    for other, net in NETWORKS.items():
        clash = [k for k in flags.keys() & net.flags.keys() if other != name and flags[k].default != net.flags[k].default]
        if clash:
            raise ValueError(f"network {name}: the flags {', '.join(sorted(clash))} of network {other} have other "
                             "defaults there; give them the same defaults, or other names")
    NETWORKS[name] = Network(build, flags, dict(ranges or {}))
    return build


def shared_flags(names):
    """{flag: (default, help)} of flags a registered network declared, for another network that takes them too (the
    same meaning and default: image_size, class_cond, ...)."""
    declared = {k: (f.default, f.help) for net in NETWORKS.values() for k, f in net.flags.items()}
    return {k: declared[k] for k in names}


register("adm", adm.build, adm.FLAGS, adm.RANGES)
register("edm2", edm2.build, {**shared_flags(edm2.SHARED), **edm2.FLAGS})
register("dit", dit.build, {**shared_flags(dit.SHARED), **dit.FLAGS})


def network_ranges():
    """{flag: (test, words)}: the ranges the registered networks declare (a flag name means the same in each)."""
    return {k: r for net in NETWORKS.values() for k, r in net.ranges.items()}


def network(name):
    """The Network registered as `name`; one clear error for an unknown name."""
    if name not in NETWORKS:
        raise ValueError(f"unknown --network {name}; choose one of {', '.join(NETWORKS)}")
    return NETWORKS[name]


def flag_defaults():
    """{flag: default} of every registered network's flags, adm's first: the network flags of every parser."""
    return {k: f.default for net in NETWORKS.values() for k, f in net.flags.items()}


def build_network(name, flags):
    """Network `name` built from its own flags in the dict `flags` (those it lacks take their defaults; the other
    networks' flags are not its business). The module keeps its name as `network_name`, so that a checkpoint of
    another network is refused when loaded into it (cm.checkpoints.load_model_weights)."""
    net = network(name)
    model = net.build(**{k: flags.get(k, f.default) for k, f in net.flags.items()})
    model.network_name = name
    return model
