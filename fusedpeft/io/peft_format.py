"""Adapter files in HF peft's format, both ways.

A peft adapter directory holds ``adapter_config.json`` (the config's fields, peft's names) and
``adapter_model.safetensors`` (or ``adapter_model.bin``) with only the adapter's tensors. A tensor's
key is its parameter name in the ``PeftModel`` with the adapter name taken out, e.g.

    base_model.model.<module path>.lora_A.weight        (model: <module path>.lora_A.<adapter>.weight)
    base_model.model.<module path>.ia3_l                (model: <module path>.ia3_l.<adapter>)
    base_model.model.<module_to_save path>.<key>        (model: <path>.modules_to_save.<adapter>.<key>)

plus, with ``bias="all"`` / ``"lora_only"``, the biases that train with the adapter. fusedpeft's
layers carry peft's parameter names, so one function (``checkpoint_keys``) maps file keys to model
keys, and saving and loading both use it: what one writes the other reads.

SSF has no peft format (peft has no SSF), so fusedpeft's own follows the same layout and rules:

    adapter_config.json        {"peft_type": "SSF", "target_modules": ..., "exclude_modules": ...,
                                "fan_in_fan_out": ..., "modules_to_save": ..., "init_ssf_weights": ...}
                               plus the bookkeeping keys peft writes (task_type, auto_mapping, ...)
    adapter_model.safetensors  base_model.model.<module path>.ssf_scale   (out_features,)
                               base_model.model.<module path>.ssf_shift   (out_features,)
                               (model: <module path>.ssf_scale.<adapter>, .ssf_shift.<adapter>)
                               plus the modules_to_save copies, keyed as above

It is written and read by the same code as LoRA and IA3, with the same checks. peft cannot load it.
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .. import distributed, methods
from ..inject import CONFIG_ATTR, inject, mark_only_adapters_trainable, set_adapter
from ..modules import AdapterLayer, ModulesToSaveWrapper

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# The keys that change the computation (refused), the init values a file may carry and the
# bookkeeping keys that are dropped are each method's: fusedpeft.methods and fusedpeft.config.


# ----------------------------------------------------------------------------- keys
def _remove_adapter_name(key: str, adapter_name: str) -> str:
    """peft's rule: 'x.lora_A.<name>.weight' -> 'x.lora_A.weight', 'x.ia3_l.<name>' -> 'x.ia3_l';
    DoRA's magnitude 'x.lora_magnitude_vector.<name>.weight' -> 'x.lora_magnitude_vector' (the key
    peft's files have kept since the magnitude was a ParameterDict)."""
    if key.endswith("." + adapter_name):
        return key[: -len(adapter_name) - 1]
    head, _, last = key.rpartition(".")
    head = re.sub(re.escape("." + adapter_name) + "$", "", head)
    if head.endswith("lora_magnitude_vector") and last == "weight":
        return head
    return f"{head}.{last}"


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def checkpoint_keys(model: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """{file key: model state_dict key} of adapter ``adapter_name``: what peft's
    ``get_peft_model_state_dict`` selects for the same model (the adapter layers' own tensors,
    the biases ``config.bias`` trains, the modules_to_save copies), keyed as peft writes them."""
    configs = getattr(model, CONFIG_ATTR, {})
    if adapter_name not in configs:
        raise KeyError(f"the model has no fusedpeft adapter {adapter_name!r}; it has {sorted(configs)}")
    config = configs[adapter_name]
    others = [n for n in configs if n != adapter_name]
    state = [
        k for k in model.state_dict(keep_vars=True)
        if not any(f".{o}." in k or k.endswith(f".{o}") for o in others)
    ]

    layer_prefixes, layer_names, wrappers = set(), [], []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w, _ in wrappers):
            continue  # the insides of a modules_to_save wrapper are saved through the wrapper
        if isinstance(module, ModulesToSaveWrapper):
            wrappers.append((name, module))
        elif isinstance(module, AdapterLayer):
            # Everything on an adapter layer but the wrapped base layer belongs to the adapters.
            own = [n for n, _ in module.named_children()]
            own += [n for n, _ in module.named_parameters(recurse=False)]
            own += [n for n, _ in module.named_buffers(recurse=False)]
            layer_prefixes.update(f"{name}.{n}" for n in own if n != "base_layer")
            layer_names.append(name)

    selected = {k: k for k in state if _under(k, layer_prefixes)}
    bias = getattr(config, "bias", "none")
    if bias == "all":
        selected.update({k: k for k in state if k == "bias" or k.endswith(".bias")})
    elif bias == "lora_only":
        selected.update({k: k for k in (f"{n}.base_layer.bias" for n in layer_names) if k in state})
    for name, wrapper in wrappers:
        if adapter_name in wrapper.modules_to_save:
            for k in wrapper.modules_to_save[adapter_name].state_dict():
                selected[f"{name}.{k}"] = f"{name}.modules_to_save.{adapter_name}.{k}"

    out: dict[str, str] = {}
    for key, model_key in selected.items():
        file_key = PREFIX + _remove_adapter_name(key, adapter_name)
        if out.get(file_key, model_key) != model_key:
            raise ValueError(f"two model tensors ({out[file_key]}, {model_key}) map to the same file key {file_key}")
        out[file_key] = model_key
    return out


# ----------------------------------------------------------------------------- save
def _json_value(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def adapter_config_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The adapter's config as peft writes it in adapter_config.json."""
    config = getattr(model, CONFIG_ATTR, {})[adapter_name]
    cls = distributed.original_class(model)
    out = {k: _json_value(v) for k, v in config.to_dict().items()}
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
    out.update(
        task_type=None,
        base_model_name_or_path=name_or_path or None,
        revision=None,
        inference_mode=True,
        # what peft writes when task_type is None (AutoPeftModel reads it to pick the base class);
        # the user's class, not the FSDP<class> that fully_shard swaps in
        auto_mapping={"base_model_class": cls.__name__, "parent_library": cls.__module__},
    )
    try:
        json.dumps(out)  # fail before anything is written
    except TypeError as e:
        raise TypeError(f"the config of adapter {adapter_name!r} is not JSON-serialisable: {e}") from e
    return out


def save_adapter(model: nn.Module, save_directory: str, adapter_name: str = "default", *,
                 is_main_process: Optional[bool] = None) -> None:
    """Write adapter ``adapter_name`` of a fusedpeft-patched ``model`` as peft does:
    ``save_directory/adapter_config.json`` and ``save_directory/adapter_model.safetensors``, so
    that ``peft.PeftModel.from_pretrained(base_model, save_directory)`` loads it (LoRA, IA3; an
    SSF adapter is written in the same layout, which only fusedpeft reads). Tensors are
    written in the dtype they have (float32 master weights stay float32), on the CPU.
    A peft model (after ``fusedpeft.from_peft``) is written by peft's own ``save_pretrained``
    (the files peft writes; an adapter other than "default" in ``save_directory/<adapter_name>``,
    as peft does), with the tensors gathered as below.

    Under torch.distributed (see README, "Distributed training"): a DistributedDataParallel
    wrapper is looked through, and only the main process writes (``is_main_process``, default:
    rank 0 of the default group; every process without one). On a model sharded by FSDP2
    (``fully_shard``) the adapter's shards are gathered into full tensors first, a collective:
    every rank must call ``save_adapter``; when it returns, on every rank, the main process has
    written the files (or every rank raises its error). The files are the ones a single process
    writes from the same weights."""
    model = distributed.unwrap(model)
    main = distributed.is_main_process() if is_main_process is None else bool(is_main_process)
    if adapter_name not in getattr(model, CONFIG_ATTR, {}) and adapter_name in _peft_adapters(model):
        return _save_peft_model(model, save_directory, adapter_name, main)
    write_adapter_files(model, save_directory, adapter_name, main)


def write_adapter_files(model: nn.Module, save_directory: str, adapter_name: str, main: bool,
                        replace: Optional[dict] = None) -> None:
    """save_adapter's files for a fusedpeft adapter of ``model`` (unwrapped). ``replace``: {file
    key: CPU tensor to write instead, or None to leave the key out} (hf_checkpoint's unmerged
    biases), applied before the one write."""
    from safetensors.torch import save_file

    keys = checkpoint_keys(model, adapter_name)
    config = adapter_config_dict(model, adapter_name)
    state = model.state_dict(keep_vars=True)
    selected = {fk: state[mk] for fk, mk in keys.items()}
    sharded = distributed.is_sharded(selected.values())
    if sharded:
        selected = distributed.full_tensors(selected)  # every rank takes part

    def write():
        # Own contiguous CPU copies: safetensors refuses tensors that share memory.
        tensors = {fk: t.detach().to("cpu", copy=True).contiguous() for fk, t in selected.items()}
        for fk, t in (replace or {}).items():
            if t is None:
                tensors.pop(fk, None)
            else:
                tensors[fk] = t
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, not a directory")
        os.makedirs(save_directory, exist_ok=True)
        save_file(tensors, os.path.join(save_directory, SAFETENSORS_NAME), metadata={"format": "pt"})
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True))

    _write_on_main(write, main, sharded, f"saving adapter {adapter_name!r} to {save_directory!r}")


def _write_on_main(write, main: bool, sharded: bool, what: str) -> None:
    """write() on the main process; on a sharded model every rank then raises its error, if any
    (distributed.agree), so that no rank waits on one that failed."""
    error = None
    if main:
        try:
            write()
        except Exception as e:  # noqa: BLE001  (raised below, on every rank of a sharded model)
            error = e
    if sharded:
        distributed.agree(error, what)
    elif error is not None:
        raise error


def _peft_adapters(model: nn.Module) -> dict:
    try:
        configs = getattr(model, "peft_config", None)
    except Exception:  # noqa: BLE001  (a PeftModel without a tuner raises from its __getattr__)
        return {}
    return configs if isinstance(configs, dict) and callable(getattr(model, "save_pretrained", None)) else {}


def _save_peft_model(model: nn.Module, save_directory: str, adapter_name: str, main: bool) -> None:
    """save_adapter of a peft model: peft's save_pretrained, given the adapter's tensors (full
    ones, gathered on every rank, where FSDP2 sharded them), on the main process only."""
    from ..adapters import _adapter_keys

    _, keys, state = _adapter_keys(model, adapter_name)
    selected = {mk: state[mk] for mk in keys.values()}
    sharded = distributed.is_sharded(selected.values())
    if sharded:
        selected = distributed.full_tensors(selected)
    _write_on_main(lambda: model.save_pretrained(save_directory, selected_adapters=[adapter_name], state_dict=selected),
                   main, sharded, f"saving adapter {adapter_name!r} to {save_directory!r}")


# ----------------------------------------------------------------------------- load
def _read_config(directory: str, residual_base_ok: bool = True):
    """The adapter's config from its adapter_config.json. ``residual_base_ok`` False (a serving bank:
    one base for every adapter) refuses an adapter made by an init that rewrote the base weights."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    data = dict(data)
    bad = [f"{k}={data[k]!r}" for k in methods.UNSUPPORTED_KEYS if data.get(k)]
    method = methods.for_peft_type(data.get("peft_type"))  # None: config_from_dict names the peft_type
    if method is not None and method.file_inits is not None and method.init_key in data:
        init = data[method.init_key]
        if isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init):
            init = "pissa"  # a randomised SVD of the same kind: the same residual-base rule
        try:
            known_init = init in method.file_inits
        except TypeError:  # an unhashable value (a list, a dict) is no init fusedpeft knows
            known_init = False
        if known_init and init in ("pissa", "olora"):
            # An init that rewrote the base weights: the file is loaded onto the base as it is, as
            # peft's instructions have the user save the residual base beside it.
            if not residual_base_ok:
                raise ValueError(f"{directory}: init_lora_weights={data[method.init_key]!r} rewrote the base weights "
                                 "when the adapter was made, so it cannot share a base model with other adapters; "
                                 "convert it to plain LoRA first")
            warnings.warn(f"{path}: the adapter was initialised with {init!r}, which rewrote the base weights at "
                          "injection; it is loaded onto the model's base weights as they are, which must be the "
                          "residual base saved after that injection")
        if known_init:
            data[method.init_key] = method.file_inits[init]  # starting values only: the file overwrites them
        else:
            bad.append(f"{method.init_key}={init!r} (it rewrites the base weights; convert the adapter to plain "
                       f"{method.name} first)")
    if bad:
        raise ValueError(f"{path} uses peft features fusedpeft does not implement: {', '.join(bad)}")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            config = methods.config_from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    for w in seen:  # from_dict's notes, said of the file
        warnings.warn(f"{path}: {w.message}", w.category)
    return config


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    st, bn = os.path.join(directory, SAFETENSORS_NAME), os.path.join(directory, BIN_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        try:
            return load_file(st, device="cpu")
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"cannot read {st}: {e}") from e
    if os.path.isfile(bn):
        try:
            weights = torch.load(bn, map_location="cpu", weights_only=True)
        except Exception as e:  # damaged file, or pickled objects other than tensors
            raise ValueError(f"cannot read {bn}: {e}") from e
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ValueError(f"{bn} does not hold a state dict of tensors")
        return weights
    raise FileNotFoundError(f"no adapter weights in {directory!r}: expected {SAFETENSORS_NAME} or {BIN_NAME}")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device (no
    memory, no compute): injecting into it shows the names and shapes a real inject would give."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    return copy.deepcopy(model, memo)


def planned_inject(model: nn.Module, config, adapter_name: str, what: str) -> nn.Module:
    """A meta-device copy of ``model`` with the adapter injected (a dry run: the names and shapes a
    real inject gives, nothing of ``model`` touched). inject's refusal is raised again, saying
    ``what`` was being done."""
    planned = _meta_copy(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject(planned, config, adapter_name)
    except (ValueError, TypeError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise type(e)(f"{what}: {msg}") from e
    return planned


def describe(names, limit: int = 6) -> str:
    """The first ``limit`` of ``names`` in sorted order, and how many more (for error messages)."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def is_base_bias(model_key: str) -> bool:
    """A bias of the base model that config.bias trains: optional in an adapter file (it belongs to the
    base model), unlike the adapter's own tensors (lora_B's bias included) and modules_to_save copies."""
    return ".modules_to_save." not in model_key and (model_key == "bias" or model_key.endswith(".bias")) \
        and ".lora_B." not in model_key


def _validate(weights, keys, state, directory, adapter_name):
    """Every check on the file against the (planned) model; raises before anything is changed."""
    required = {fk for fk, mk in keys.items() if not is_base_bias(mk)}
    missing = required - set(weights)
    if missing:
        raise ValueError(f"adapter file in {directory!r} is missing keys for adapter {adapter_name!r}: {describe(missing)}")
    unexpected = set(weights) - set(keys)
    if unexpected:
        raise ValueError(
            f"adapter file in {directory!r} has unexpected keys (no such adapter tensor in the model): {describe(unexpected)}"
        )
    for fk, t in sorted(weights.items()):
        target = state[keys[fk]]
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(
                f"adapter file in {directory!r}: {fk} has shape {tuple(t.shape)} but the model expects {tuple(target.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise ValueError(f"adapter file in {directory!r}: {fk} is {t.dtype}, not a floating-point tensor")


def load_adapter(model: nn.Module, load_directory: str, adapter_name: str = "default", is_trainable: bool = False) -> nn.Module:
    """Load a peft adapter directory (what ``PeftModel.save_pretrained`` or :func:`save_adapter`
    wrote; LoRA or IA3, safetensors or .bin; SSF in fusedpeft's own format, see the module
    docstring) into ``model`` as adapter ``adapter_name`` and make it the active adapter.

    Where the model has no adapter of that name it is injected first (``fusedpeft.inject`` with
    the file's config); an existing one of the same method and config gets its weights
    replaced. Weights are cast to each parameter's dtype and device. With ``is_trainable=False``
    (peft's default) the adapter's tensors (LoRA / IA3 / SSF weights, modules_to_save copies) are
    frozen; as in peft, biases trained by ``bias="all"`` / ``"lora_only"`` stay trainable.

    Everything (config, key set, shapes, targets) is checked before the model is touched: a bad
    or mismatched file raises naming the problem and leaves the model exactly as it was.

    Under torch.distributed a DistributedDataParallel wrapper is looked through (every rank
    loads its own copy). Into a model sharded by FSDP2 (``fully_shard``) an adapter the model
    already has is loaded: every rank must call ``load_adapter``, every rank reads and checks the
    file (a failure on any rank raises on every rank, nothing changed), and rank 0's tensors are
    scattered into the shards. A new adapter cannot be added to a sharded model (ValueError):
    load it before ``fully_shard``.
    """
    model = distributed.unwrap(model)
    if not distributed.model_is_sharded(model):
        config, weights, keys, exists = _plan_load(model, load_directory, adapter_name, sharded=False)
    else:
        # Every rank reads and checks the file; one that fails makes every rank raise, before the
        # collectives that fill the shards (rank 0's tensors are scattered).
        error = plan = None
        try:
            plan = _plan_load(model, load_directory, adapter_name, sharded=True)
        except Exception as e:  # noqa: BLE001  (raised by agree, on every rank)
            error = e
        distributed.agree(error, f"loading the adapter in {load_directory!r}")
        config, weights, keys, exists = plan

    # All checks passed: change the model.
    if not exists:
        inject(model, config, adapter_name)
    state = model.state_dict(keep_vars=True)
    for fk in sorted(weights):  # one order on every rank: a sharded target's copy is a collective
        distributed.copy_into(state[keys[fk]], weights[fk])
    set_adapter(model, adapter_name)
    mark_only_adapters_trainable(model, bias=getattr(config, "bias", "none"))
    if not is_trainable:
        freeze_adapter(state, adapter_name, keys.values())
    return model


def freeze_adapter(state: dict, adapter_name: str, model_keys) -> None:
    """peft's inference mode: the adapter's own tensors (names carrying the adapter name) among
    ``model_keys`` are frozen; biases that config.bias trains keep the flag they had."""
    for mk in set(model_keys):
        if f".{adapter_name}." in mk or mk.endswith(f".{adapter_name}"):
            state[mk].requires_grad_(False)


def _plan_load(model: nn.Module, load_directory: str, adapter_name: str, sharded: bool):
    """load_adapter's reading and checks, nothing changed: (config, weights, {file key: model
    key}, whether the adapter exists already)."""
    if not os.path.isdir(load_directory):
        raise FileNotFoundError(f"adapter directory {load_directory!r} does not exist")
    config = _read_config(load_directory)
    weights = _read_weights(load_directory)
    configs = getattr(model, CONFIG_ATTR, {})
    exists = adapter_name in configs

    if exists:
        current = configs[adapter_name]
        if current.peft_type != config.peft_type:
            raise ValueError(
                f"the model's adapter {adapter_name!r} is {current.peft_type} but {load_directory!r} holds {config.peft_type}"
            )
        skip = methods.INIT_KEYS  # starting values only
        a, b = current.to_dict(), config.to_dict()
        differ = sorted(k for k in a if k not in skip and a[k] != b.get(k))
        if differ:
            raise ValueError(
                f"the model already has an adapter {adapter_name!r} whose config differs from {load_directory!r} in "
                f"{differ}; load it under another adapter_name"
            )
        planned = model
    elif sharded:
        raise ValueError(
            f"cannot load {load_directory!r} as a new adapter {adapter_name!r} into a model sharded by FSDP2 "
            "(fully_shard): new adapter parameters would not be sharded. Load (or inject) the adapter before "
            "fully_shard, or load into an adapter of that name the model already has")
    else:
        planned = planned_inject(model, config, adapter_name,
                                 f"cannot load the adapter in {load_directory!r} into {type(model).__name__}")
    keys = checkpoint_keys(planned, adapter_name)
    _validate(weights, keys, planned.state_dict(keep_vars=True), load_directory, adapter_name)
    return config, weights, keys, exists
