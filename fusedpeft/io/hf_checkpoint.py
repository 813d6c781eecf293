"""transformers' ``save_pretrained`` / ``from_pretrained`` for a model fusedpeft has patched.

The problem. ``fusedpeft.inject`` moves every adapted layer's original module under
``.base_layer`` (and a modules_to_save original under ``.original_module``), so a plain
``model.save_pretrained(d)`` (and every Trainer checkpoint) wrote the base weights as
``...q_proj.base_layer.weight``; ``LlamaForCausalLM.from_pretrained(d)`` then found no
``...q_proj.weight``, re-initialised it at random and only logged a warning.

What :func:`install` changes, on one transformers ``PreTrainedModel`` instance (any other module:
nothing, ``install`` returns False):

1. ``model.save_pretrained`` becomes a wrapper (an attribute of the instance; the class is not
   touched) that hands transformers' own ``save_pretrained`` a translated state dict (the model's,
   or the ``state_dict=`` the caller passed, as the Trainer does), see :func:`saved_state_dict`:

   - ``<x>.base_layer.<p>`` -> ``<x>.<p>`` and ``<w>.original_module.<p>`` -> ``<w>.<p>``: the
     base weights under the names the plain model has, so ``from_pretrained(d)`` loads the base
     exactly (bit for bit) and transformers' own steps (tied-weight de-duplication,
     ``_keys_to_ignore_on_save``, the weight-conversion revert, sharding) see the names they know;
   - the adapter tensors (``lora_A.<adapter>.weight``, ``ia3_l.<adapter>``, ``ssf_*``,
     ``modules_to_save.<adapter>.*``) stay in the file under the model's own names. A plain
     ``from_pretrained(d)`` lists them as unexpected keys (transformers' load report) and ignores
     them; they are there so that the Trainer's ``resume_from_checkpoint`` and
     ``load_best_model_at_end``, which read ``model.safetensors`` back with
     ``model.load_state_dict(..., strict=False)`` into the live patched model, restore the
     adapters too (without them those silently kept the adapter of the moment).

   After transformers has written its files, on the process that saves, every adapter is written
   in peft's format, as ``fusedpeft.save_adapter`` writes it, in peft's layout: the adapter named
   ``"default"`` in ``d`` itself (``adapter_config.json`` + ``adapter_model.safetensors``), every
   other adapter in ``d/<adapter name>/``. Exception: an adapter whose type peft cannot read (SSF)
   always goes to ``d/<adapter name>/``, also ``"default"`` (``d/default/``): transformers reads an
   ``adapter_config.json`` next to ``config.json`` with peft when peft is installed, and peft raises
   on ``"peft_type": "SSF"``, so ``from_pretrained(d)`` itself would fail. ``d/fusedpeft_adapters.json``
   records ``{"adapters": {name: subfolder ("." for d)}, "active": [...]}`` for :func:`from_pretrained`.
   When no adapter goes to ``d`` itself, an ``adapter_config.json`` / ``adapter_model.*`` left
   there by an earlier save is removed (transformers would otherwise apply that stale adapter).

   Merged adapters: the base written is the unmerged base, computed on a copy of each merged layer
   (``layer.unmerge()`` on a deepcopy: exact up to one rounding of the weight's dtype, as
   ``fusedpeft.unmerge``); the live model stays merged and unchanged. Biases in an adapter file
   (``bias="all"`` / ``"lora_only"``) are written unmerged the same way. So the directory always
   holds base + adapters, never the adapter twice; a reload is unmerged (``fusedpeft.merge`` again
   if wanted). A merged model meant to be saved as a plain model: ``fusedpeft.eject(model,
   merge=True)`` first.

   Refused with an error (nothing written): ``push_to_hub=True`` (transformers would upload before
   the adapter files exist; use ``model.push_to_hub(repo)``, which saves through this wrapper), a
   quantized model (transformers builds its own state dict then), and a model that also carries
   adapters of transformers' own peft integration. ``distributed_checkpoint=True`` (a DCP
   checkpoint, only for resuming) is passed through unchanged: it must keep the live names.

2. A ``load_state_dict`` pre-hook on the model maps a key under its base name (``<x>.weight``
   where ``<x>`` is an adapter layer, ``<w>.weight`` where ``<w>`` is a modules_to_save wrapper)
   to the patched name (``<x>.base_layer.weight``, ``<w>.original_module.weight``) when the state
   dict does not hold the patched name itself. This is what lets a Trainer resume from such a
   checkpoint (and lets a plain model's state dict load into the patched model's base). Loading
   base weights that way into a layer whose adapters are merged raises (the layer would then be
   inconsistent): unmerge first. (The Trainer's resume of a *sharded* checkpoint,
   ``load_sharded_checkpoint``, compares the index's names with ``model.state_dict()`` before it
   loads and so logs the base keys as missing; it then loads every shard through
   ``load_state_dict``, which maps them: the warning is wrong, the weights are right.)

What is not changed: ``model.state_dict()`` keeps fusedpeft's names (torch.save checkpoints,
``load_state_dict`` of them, optimizers, DDP/FSDP, ``fusedpeft.io.peft_format.checkpoint_keys``
all rely on them); only what ``save_pretrained`` writes is translated. Saves that bypass
``save_pretrained`` (``accelerate.save_model``, FSDP's own sharded checkpoints, a Trainer whose
model is not a PreTrainedModel) still write fusedpeft's names.

Reloading a directory ``d`` written this way:

- ``Cls.from_pretrained(d)`` loads the base exactly. Without peft installed that is all it does:
  ``fusedpeft.load_adapter(model, d)`` (and ``fusedpeft.load_adapter(model, d/<name>, name)`` for
  each other adapter, then ``fusedpeft.set_adapter``) restores the adapters.
- With peft installed, transformers itself loads the adapter in ``d`` (``"default"``) with peft's
  own layers (peft's LoRA / IA3 ``Linear``), as it does for any directory holding an
  ``adapter_config.json``: same outputs when ``"default"`` was the only active adapter, but peft's
  layers, and ``fusedpeft.load_adapter`` on top of them raises (its targets are no longer
  ``nn.Linear``). ``fusedpeft.from_peft(model)`` swaps those layers for fused ones.
- :func:`from_pretrained` (``hf_checkpoint.from_pretrained(LlamaForCausalLM, d, **kwargs)``) gives
  the same result with or without peft: it loads the base with transformers' adapter auto-loading
  switched off for that call (the module-level ``transformers.modeling_utils.maybe_load_adapters``
  is replaced under a lock while it runs; another thread's ``from_pretrained`` in that window also
  skips it), loads every recorded adapter with ``fusedpeft.load_adapter``, restores the active
  adapters and installs this module's hooks on the result. A local directory only. (transformers'
  own load report still lists the adapter tensors of ``model.safetensors`` as unexpected: it runs
  before the adapters are in; the ``output_loading_info`` this function returns leaves them out.)

A hub repository made from such a directory: for a repository id (not a local path), transformers
with peft installed loads the base named by ``adapter_config.json``'s ``base_model_name_or_path``
(the name the model was loaded under) instead of the repository's own weights.

Wiring: ``fusedpeft.inject`` is to call :func:`install` on the model it patched (once patching
succeeded; ``fusedpeft.load_adapter`` injects, so it installs too), and ``fusedpeft.eject`` is to
call :func:`uninstall` before it takes the layers out; after that ``save_pretrained`` and
``load_state_dict`` are transformers' and torch's again. Both import this module inside the
function (``fusedpeft.io`` imports ``fusedpeft.inject``, so a top-level import would be circular).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import threading
from typing import Any, Optional

import torch
from torch import nn

from ..modules import AdapterLayer, ModulesToSaveWrapper

RECORD_NAME = "fusedpeft_adapters.json"
# The peft_types whose adapter files peft itself reads (and so transformers, with peft installed).
PEFT_READABLE_TYPES = frozenset({"LORA", "IA3"})
DEFAULT_ADAPTER = "default"

_HOOK_ATTR = "_fusedpeft_hf_checkpoint"  # the id of the load_state_dict pre-hook, on the instance
_AUTOLOAD_LOCK = threading.RLock()


# ----------------------------------------------------------------------------- install / uninstall
def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


class _SavePretrained:
    """``model.save_pretrained`` while :func:`install` is in effect (see the module docstring).

    A callable object rather than a bound method, so that ``copy.deepcopy`` and pickling carry it
    over bound to the copy."""

    def __init__(self, model: nn.Module, previous: Optional[Any]):
        self.model = model
        self.previous = previous  # an instance attribute save_pretrained that was there before, if any
        self.__doc__ = (
            "transformers' save_pretrained, writing the base weights under their original names and "
            "the fusedpeft adapters in peft's format beside them (fusedpeft.io.hf_checkpoint)."
        )

    def original(self):
        if self.previous is not None:
            return self.previous
        return type(self.model).save_pretrained.__get__(self.model, type(self.model))

    def __call__(self, save_directory, *args, **kwargs):
        return _save_pretrained(self.model, self.original(), save_directory, *args, **kwargs)

    def __repr__(self):
        return f"<fusedpeft save_pretrained of {type(self.model).__name__}>"


def installed(model: nn.Module) -> bool:
    """Whether :func:`install` is in effect on ``model``."""
    hook_id = model.__dict__.get(_HOOK_ATTR)
    wrapper = model.__dict__.get("save_pretrained")
    return (
        hook_id is not None
        and hook_id in model._load_state_dict_pre_hooks
        and isinstance(wrapper, _SavePretrained)
        and wrapper.model is model
    )


def install(model: nn.Module) -> bool:
    """Make ``model.save_pretrained`` write a reloadable checkpoint and ``model.load_state_dict``
    accept one (see the module docstring). Only transformers ``PreTrainedModel`` instances are
    changed; for any other module this does nothing and returns False. Calling it again is a
    no-op (True)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"install takes an nn.Module, got {type(model).__name__}")
    if not is_transformers_model(model):
        return False
    if installed(model):
        return True
    _remove(model)  # a half state (e.g. a copy whose wrapper points elsewhere): start clean
    previous = model.__dict__.get("save_pretrained")
    handle = model.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    object.__setattr__(model, _HOOK_ATTR, handle.id)
    object.__setattr__(model, "save_pretrained", _SavePretrained(model, previous))
    return True


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install`: ``save_pretrained`` and ``load_state_dict`` behave as transformers'
    and torch's again. A model it was never installed on is left as it is."""
    _remove(model)


def _remove(model: nn.Module) -> None:
    hook_id = model.__dict__.get(_HOOK_ATTR)
    if hook_id is not None:
        model._load_state_dict_pre_hooks.pop(hook_id, None)
        object.__delattr__(model, _HOOK_ATTR)
    wrapper = model.__dict__.get("save_pretrained")
    if isinstance(wrapper, _SavePretrained):
        if wrapper.previous is not None and getattr(wrapper.previous, "__self__", model) is model:
            object.__setattr__(model, "save_pretrained", wrapper.previous)
        else:
            object.__delattr__(model, "save_pretrained")


# ----------------------------------------------------------------------------- name translation
_KEEP = None  # a key that keeps its name (an adapter tensor, or not under an adapter layer)


class _SavedNames:
    """Maps a key of the patched model's state dict to its name in a plain model. Returns
    (name, layer, rest): ``layer`` is the adapter layer whose base holds the tensor directly
    (``rest``: the tensor's name in that base), else None; or None when the key keeps its name."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache: dict[str, Any] = {}

    def __call__(self, key: str):
        path, _, leaf = key.rpartition(".")
        if path not in self.cache:
            self.cache[path] = self._walk(path)
        found = self.cache[path]
        if found is _KEEP:
            return _KEEP
        new_path, layer = found
        return (f"{new_path}.{leaf}" if new_path else leaf), layer, leaf

    def _walk(self, path: str):
        module, out, layer, changed = self.model, [], None, False
        for seg in path.split(".") if path else []:
            if isinstance(module, AdapterLayer):
                if seg != "base_layer":
                    return _KEEP  # the layer's own tensors: the adapters
                module, layer, changed = module.base_layer, module, True
                continue
            if isinstance(module, ModulesToSaveWrapper):
                if seg != "original_module":
                    return _KEEP  # the trained copies
                module, layer, changed = module.original_module, None, True
                continue
            child = module._modules.get(seg)
            if child is None:
                return _KEEP  # not a module path of this model: leave the key alone
            out.append(seg)
            module, layer = child, None
        if not changed or isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            return _KEEP
        return ".".join(out), layer


def _unmerged_base(layer: AdapterLayer) -> dict[str, torch.Tensor]:
    """The base layer's tensors with the merged adapters taken out, from a copy of the layer
    (the live layer stays merged)."""
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.unmerge()
    return {k: v.detach() for k, v in twin.base_layer.state_dict().items()}


class _Unmerged:
    """The unmerged base tensors of merged layers, computed once per save."""

    def __init__(self):
        self.by_layer: dict[int, dict[str, torch.Tensor]] = {}

    def get(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        if id(layer) not in self.by_layer:
            self.by_layer[id(layer)] = _unmerged_base(layer)
        return self.by_layer[id(layer)]


_DROP = object()


def _saved_value(layer: Optional[AdapterLayer], rest: str, value, unmerged: _Unmerged):
    if layer is None or not layer.merged:
        return value
    # _DROP: e.g. the bias a merged SSF shift gave a bias-free layer
    return unmerged.get(layer).get(rest, _DROP)


def saved_state_dict(model: nn.Module, state_dict: Optional[dict] = None, _unmerged: Optional[_Unmerged] = None) -> dict:
    """The state dict ``save_pretrained`` writes for a patched model: ``state_dict`` (default:
    ``model.state_dict()``) with every base tensor under its plain-model name
    (``<x>.base_layer.<p>`` -> ``<x>.<p>``, ``<w>.original_module.<p>`` -> ``<w>.<p>``), the
    base of a merged layer unmerged (computed on a copy of the layer), and every other key (the
    adapter tensors, anything that is not a path of ``model``) as it is. Raises if two keys would
    get the same name."""
    if state_dict is None:
        state_dict = model.state_dict()
    unmerged = _unmerged if _unmerged is not None else _Unmerged()
    names = _SavedNames(model)
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in state_dict.items():
        found = names(key)
        if found is _KEEP:
            new = key
        else:
            new, layer, rest = found
            value = _saved_value(layer, rest, value, unmerged)
            if value is _DROP:
                continue
        if new in out:
            raise ValueError(f"state dict keys {source[new]!r} and {key!r} would both be saved as {new!r}")
        out[new] = value
        source[new] = key
    return out


def _live_name(model: nn.Module, key: str):
    """The patched model's name for a key given under its plain-model name, and the adapter layer
    whose base holds it (or None); None when the key needs no change."""
    parts = key.split(".")
    module, out, layer, changed, i = model, [], None, False, 0
    while i < len(parts):
        seg = parts[i]
        if isinstance(module, AdapterLayer) and not (
            seg in module._modules or seg in module._parameters or seg in module._buffers
        ):
            out.append("base_layer")
            module, layer, changed = module.base_layer, module, True
            continue
        if isinstance(module, ModulesToSaveWrapper) and seg not in ("original_module", "modules_to_save"):
            out.append("original_module")
            module, layer, changed = module.original_module, None, True
            continue
        if i == len(parts) - 1:
            if not changed:
                return None
            present = module._parameters.get(seg) is not None or module._buffers.get(seg) is not None
            return (".".join(out + [seg]), layer) if present else None
        child = module._modules.get(seg)
        if child is None:
            return None
        out.append(seg)
        module, layer, i = child, None, i + 1
    return None


def _load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    renames = {}
    for key in list(state_dict.keys()):
        if not key.startswith(prefix):
            continue
        found = _live_name(module, key[len(prefix):])
        if found is None:
            continue
        new, layer = found
        new = prefix + new
        if new in state_dict:
            continue  # the patched name is there too: it is the one that loads
        if layer is not None and layer.merged:
            raise ValueError(
                f"cannot load {key!r} into {new!r}: adapters {layer.merged_adapters} are merged into that layer's "
                "base weight; fusedpeft.unmerge(model) first"
            )
        renames[key] = new
    for old, new in renames.items():
        state_dict[new] = state_dict.pop(old)


# ----------------------------------------------------------------------------- save
def _adapter_configs(model: nn.Module) -> dict:
    from ..inject import CONFIG_ATTR

    return dict(getattr(model, CONFIG_ATTR, {}) or {})


def _active_adapters(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, m in model.named_modules():
        if isinstance(m, (AdapterLayer, ModulesToSaveWrapper)):
            names += [n for n in m.active_adapters if n not in names]
    return names


def adapter_subfolders(model: nn.Module) -> dict[str, str]:
    """{adapter name: the subfolder of the save directory its files go to ("" for the directory
    itself)}: peft's layout ("default" in the directory, any other in a subfolder of its name),
    except that an adapter peft cannot read (SSF) always gets its own subfolder."""
    out = {}
    for name, config in _adapter_configs(model).items():
        top = name == DEFAULT_ADAPTER and str(getattr(config, "peft_type", "")) in PEFT_READABLE_TYPES
        out[name] = "" if top else name
    return out


def _bias_overrides(model: nn.Module, adapter_name: str, unmerged: _Unmerged) -> dict:
    """{file key: unmerged tensor, or None to leave it out} for the base tensors (trained biases)
    that adapter ``adapter_name``'s file would otherwise hold merged."""
    from .peft_format import checkpoint_keys

    names = _SavedNames(model)
    out = {}
    for file_key, model_key in checkpoint_keys(model, adapter_name).items():
        found = names(model_key)
        if found is _KEEP:
            continue
        _, layer, rest = found
        if layer is not None and layer.merged:
            base = unmerged.get(layer)
            out[file_key] = base[rest].detach().to("cpu", copy=True).contiguous() if rest in base else None
    return out


def _write_adapters(model: nn.Module, directory: str, folders: dict[str, str], unmerged: _Unmerged) -> None:
    from .peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, write_adapter_files

    if "" not in folders.values():
        for stale in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
            path = os.path.join(directory, stale)
            if os.path.isfile(path):
                os.remove(path)
    for name, sub in folders.items():
        target = os.path.join(directory, sub) if sub else directory
        write_adapter_files(model, target, name, main=True, replace=_bias_overrides(model, name, unmerged))
    record = {"adapters": {n: (s or ".") for n, s in folders.items()}, "active": _active_adapters(model)}
    with open(os.path.join(directory, RECORD_NAME), "w") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True))


def _save_pretrained(model: nn.Module, original, save_directory, *args, **kwargs):
    configs = _adapter_configs(model)
    has_layers = any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in model.modules())
    if not configs or not has_layers:
        return original(save_directory, *args, **kwargs)
    try:
        bound = inspect.signature(original).bind(save_directory, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"save_pretrained: {e}") from e
    arguments = bound.arguments
    if "state_dict" not in inspect.signature(original).parameters:
        raise TypeError("this transformers version's save_pretrained takes no state_dict: fusedpeft cannot translate "
                        "the names it saves")
    if arguments.get("distributed_checkpoint"):
        return original(*bound.args, **bound.kwargs)  # a DCP resume checkpoint keeps the live names
    if arguments.get("push_to_hub"):
        raise ValueError(
            "save_pretrained(push_to_hub=True) of a fusedpeft-patched model would upload before the adapter files "
            "are written: save locally, or call model.push_to_hub(repo_id), which saves through the same path"
        )
    if getattr(model, "hf_quantizer", None) is not None:
        raise NotImplementedError(
            "save_pretrained of a quantized model builds its own state dict, which fusedpeft cannot translate: "
            "save the adapters with fusedpeft.save_adapter"
        )
    if getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError(
            "the model holds adapters of transformers' own peft integration beside fusedpeft's; save_pretrained "
            "would write only peft's: save fusedpeft's with fusedpeft.save_adapter"
        )
    if os.path.isfile(os.fspath(save_directory)):
        return original(*bound.args, **bound.kwargs)  # transformers reports it (and writes nothing)

    from .peft_format import adapter_config_dict

    folders = adapter_subfolders(model)
    for name in folders:
        adapter_config_dict(model, name)  # a config that cannot be written fails before anything is
    unmerged = _Unmerged()
    arguments["state_dict"] = saved_state_dict(model, arguments.get("state_dict"), unmerged)
    result = original(*bound.args, **bound.kwargs)

    is_main = arguments.get("is_main_process", True)
    should = getattr(model, "should_save_on_this_rank", None)
    if callable(should):
        is_main = should(is_main)
    if is_main:
        _write_adapters(model, os.fspath(save_directory), folders, unmerged)
    return result


# ----------------------------------------------------------------------------- load
def read_record(directory: str) -> tuple[dict[str, str], list[str]]:
    """({adapter name: its directory}, active adapters) of a directory ``save_pretrained`` wrote:
    from its fusedpeft_adapters.json; without one, the adapter in the directory itself, if any, as
    "default"."""
    from .peft_format import CONFIG_NAME

    path = os.path.join(directory, RECORD_NAME)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                record = json.load(f)
            adapters = {str(n): str(s) for n, s in record["adapters"].items()}
            active = [str(n) for n in record.get("active") or []]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid {RECORD_NAME}: {e}") from e
    elif os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        adapters, active = {DEFAULT_ADAPTER: "."}, [DEFAULT_ADAPTER]
    else:
        adapters, active = {}, []
    dirs = {}
    for name, sub in adapters.items():
        target = os.path.normpath(os.path.join(directory, sub))
        if os.path.relpath(target, os.path.normpath(directory)).startswith(".."):
            raise ValueError(f"{path}: adapter {name!r} points outside {directory!r} ({sub!r})")
        dirs[name] = target
    active = [n for n in active if n in dirs] or list(dirs)[:1]
    return dirs, active


def _trains_biases(directory: str) -> bool:
    """Whether the adapter in ``directory`` saves biases (bias="all" / "lora_only"). Such an adapter
    is loaded after the others: its file names a bias of a layer another adapter adapts
    ``<x>.base_layer.bias``, a name that exists only once that adapter is in."""
    from .peft_format import CONFIG_NAME

    try:
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return json.load(f).get("bias", "none") not in (None, "none")
    except (OSError, ValueError, AttributeError):
        return False  # load_adapter reports the problem


@contextlib.contextmanager
def _no_adapter_autoload():
    """transformers' from_pretrained without its peft adapter auto-loading, for this call."""
    try:
        from transformers import modeling_utils
    except ImportError:
        yield
        return
    original = getattr(modeling_utils, "maybe_load_adapters", None)
    if original is None:
        yield
        return

    def no_adapter(pretrained_model_name_or_path, *args, **adapter_kwargs):
        adapter_kwargs.pop("_adapter_model_path", None)
        return None, pretrained_model_name_or_path, adapter_kwargs

    with _AUTOLOAD_LOCK:
        modeling_utils.maybe_load_adapters = no_adapter
        try:
            yield
        finally:
            modeling_utils.maybe_load_adapters = original


def from_pretrained(model_class, directory: str, *model_args, is_trainable: bool = False, **kwargs):
    """Load a directory that ``save_pretrained`` of a patched model wrote: the base through
    ``model_class.from_pretrained(directory, *model_args, **kwargs)`` (transformers' own peft
    adapter loading switched off for the call), then every adapter the directory records with
    ``fusedpeft.load_adapter``, the active adapters as they were saved; :func:`install` is applied
    to the result. ``is_trainable``: as ``fusedpeft.load_adapter``'s (False: the adapters are
    frozen). With ``output_loading_info=True`` the adapter tensors that ``model.safetensors`` also
    holds are not listed as unexpected keys. ``directory`` must be a local directory."""
    from ..inject import set_adapter
    from .peft_format import checkpoint_keys, freeze_adapter, load_adapter

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a local directory (fusedpeft reads adapters from local files)")
    adapters, active = read_record(directory)
    want_info = kwargs.pop("output_loading_info", False)
    with _no_adapter_autoload():
        model, info = model_class.from_pretrained(directory, *model_args, output_loading_info=True, **kwargs)
    if getattr(model, "_hf_peft_config_loaded", False):
        raise RuntimeError(
            f"transformers loaded the adapter in {directory!r} with peft's own layers (its adapter auto-loading could "
            "not be switched off in this transformers version); load the base from a directory without adapter files"
        )
    for name in sorted(adapters, key=lambda n: _trains_biases(adapters[n])):
        load_adapter(model, adapters[name], adapter_name=name, is_trainable=is_trainable)
    if active:
        set_adapter(model, active)
        if not is_trainable:
            state = model.state_dict(keep_vars=True)
            for name in adapters:
                freeze_adapter(state, name, checkpoint_keys(model, name).values())
    install(model)
    if not want_info:
        return model
    known = set(model.state_dict().keys())
    info = dict(info)
    info["unexpected_keys"] = type(info.get("unexpected_keys", set()))(
        k for k in info.get("unexpected_keys", ()) if k not in known
    )
    return model, info
