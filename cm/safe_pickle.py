"""Reading pickles of other codebases' objects without running their code: NVlabs' network pickles (EDM2's published
checkpoints, which embed their classes' source code through torch_utils.persistence) and their reference statistics.

The unpickler resolves only tensors and storages (rebuilt by torch's own functions, storages read with
torch.load(weights_only=True)), numpy arrays and scalars, plain containers, and stand-ins for the few classes such files
name: a persistent object becomes a Record of its class name and state (its embedded module source is never compiled),
a torch container module or an EasyDict a Record or a dict. Any other global is refused in one line naming it, before
anything of it is called: a crafted pickle cannot run code.
"""

import collections
import io
import pickle

import numpy as np
import torch


class Record:
    """What an object of another codebase's class becomes: its class name and its pickled state (for a torch module,
    its __dict__: _parameters, _buffers, _modules, ...)."""

    def __init__(self, class_name, state=None):
        self.class_name, self.state = class_name, state if state is not None else {}

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"Record({self.class_name})"


def _persistent_object(meta):
    """torch_utils.persistence's reconstruction, without its module source: the class name and state only."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("a persistent object of an unknown kind")
    return Record(meta["class_name"], dict(meta.get("state") or {}))


def _record_class(name):
    return type(name, (Record,), {"__init__": lambda self, *args: Record.__init__(self, name)})


class _EasyDict(dict):
    """dnnlib.EasyDict's stand-in: a dict (its attribute access is not needed to read the file)."""


def _storage_from_bytes(data):
    return torch.load(io.BytesIO(data), weights_only=True)


# (module, name) -> the callable used in its place; nothing else resolves
ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch.nn.modules.container", "ModuleDict"): _record_class("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _record_class("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _record_class("Sequential"),
    ("copyreg", "__newobj__"): lambda cls, *args: cls.__new__(cls, *args),
    ("copyreg", "_reconstructor"): lambda cls, base, state: cls.__new__(cls),
    # numpy's own rebuilders of arrays and scalars (named by numpy 1 and 2), taken from numpy's own reductions
    **{(module, "_reconstruct"): np.zeros(1).__reduce__()[0] for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): np.float32(0).__reduce__()[0] for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused: the pickle asks for {module}.{name}, which is not a tensor, array, "
                                         "container or known network record (nothing of it was run)")
        return ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused: a persistent id (not a plain pickle)")


def safe_load(path):
    """The object pickled in file `path`, read by RestrictedUnpickler; one ValueError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, IndexError) as err:
        raise ValueError(f"{path}: {err}") from None


def module_state(record, prefix=""):
    """The state dict (name -> tensor) of a torch module read as a Record: its parameters and buffers, recursively."""
    state = record.state
    out = {}
    for key in ("_parameters", "_buffers"):
        for name, value in (state.get(key) or {}).items():
            if value is not None:
                out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Record):
            out.update(module_state(child, f"{prefix}{name}."))
    return out
