"""Model-level adapter management, as peft's ``PeftModel`` / ``LoraModel`` methods offer it:
delete an adapter, combine LoRA adapters into a new one, read and write one adapter's state dict
in peft's key format, and hot-swap new weights into an existing adapter in place.

Each function takes a model patched by :func:`fusedpeft.inject` (adapters in the model's
``inject.CONFIG_ATTR`` dict) or a peft model after :func:`fusedpeft.from_peft` (a ``PeftModel``
whose layers were swapped; its adapters live in peft's ``peft_config``). A ``torch.compile``'d
model (``OptimizedModule``) is unwrapped. Every function checks everything first and changes the
model only once all checks passed: a refused call leaves the model as it was.

On a peft model the functions follow peft's own code: ``delete_adapter`` and
``add_weighted_adapter`` run peft's methods after fusedpeft's checks, the state dicts are the ones
peft's ``get_peft_model_state_dict`` selects, and ``hotswap_adapter`` swaps the weights of the
fused layers (layers ``from_peft`` left as peft's are refused).
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import distributed
from .config import _pattern_value, lora_scaling
from .inject import CONFIG_ATTR, _active_names, _wrappers, adapter_layers, inject, set_adapter
from .io.peft_format import (PREFIX, _read_config, _read_weights, checkpoint_keys, describe, is_base_bias,
                              planned_inject)
from .modules import AdapterLayer, LoraLinear

__all__ = [
    "add_weighted_adapter",
    "delete_adapter",
    "get_adapter_state_dict",
    "hotswap_adapter",
    "set_adapter_state_dict",
]

# peft's combination types: the ones fusedpeft computes, and the others (NotImplementedError).
SUPPORTED_COMBINATIONS = ("svd", "linear", "cat")
_PEFT_COMBINATIONS = SUPPORTED_COMBINATIONS + (
    "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
    "magnitude_prune_svd",
)
# Inits that rewrite the base weights when an adapter is injected (never wanted for a combination).
_BASE_REWRITING_INITS = ("pissa", "olora")


# ----------------------------------------------------------------------------- which model, which adapter
def _refuse_sharded(model: nn.Module, what: str) -> None:
    """Adding, deleting or rewriting adapter parameters outside forward is not done on a model
    FSDP2 (fully_shard) sharded: its parameters are DTensor shards that FSDP2 keeps track of."""
    if distributed.model_is_sharded(model):
        raise NotImplementedError(f"{what} is not supported on a model sharded by FSDP2 (fully_shard): do it before "
                                  "fully_shard, or on an unsharded model that loads the saved adapter")


def _fused_configs(model: nn.Module) -> dict:
    return getattr(model, CONFIG_ATTR, None) or {}


def _peft_configs(model: nn.Module) -> Optional[dict]:
    """peft's {adapter name: config} of a PeftModel / peft tuner, or None."""
    try:
        configs = getattr(model, "peft_config", None)
    except Exception:  # a PeftModel without a tuner raises from its __getattr__
        return None
    return configs if isinstance(configs, dict) else None


def _owner(model: nn.Module, adapter_name: str) -> tuple[str, dict]:
    """("fused", fusedpeft's configs) or ("peft", peft's configs) for the dict holding the adapter;
    a KeyError naming the adapters the model has otherwise."""
    fused, peft_configs = _fused_configs(model), _peft_configs(model)
    if adapter_name in fused:
        return "fused", fused
    if peft_configs is not None and adapter_name in peft_configs:
        return "peft", peft_configs
    known = sorted(set(fused) | set(peft_configs or {}))
    if not known:
        raise KeyError(f"adapter {adapter_name!r} not found: {type(model).__name__} has no adapters "
                       "(call fusedpeft.inject, or fusedpeft.from_peft on a peft model, first)")
    raise KeyError(f"adapter {adapter_name!r} not found; the model has {known}")


def _peft_type(config) -> str:
    value = getattr(config, "peft_type", None)
    return str(getattr(value, "value", value))


def _merged_where(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of the layers (fusedpeft's or peft's) where the adapter is merged into the base."""
    return [n for n, m in model.named_modules()
            if adapter_name in (getattr(m, "merged_adapters", None) or ()) and hasattr(m, "base_layer")]


# ----------------------------------------------------------------------------- delete_adapter
def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name`` from every layer, from every modules_to_save wrapper (its
    copy) and from the model's config dict, and return the model.

    As peft's ``delete_adapter``: an unknown name is refused (KeyError naming the adapters there
    are), and so is an adapter merged into any layer's base weight (ValueError: unmerge it first;
    checked on all layers before any changes). When the deleted adapter was active, the other
    active adapters stay active; when none is left, the first remaining adapter in sorted order
    becomes active (with peft's warning), or none when no adapter is left. fusedpeft picks that
    adapter once for the whole model (peft picks per layer among the layer's own adapters; the
    two agree when every layer holds every adapter). Layers left without adapters stay in the
    model, as in peft, and compute their base layer.

    On a peft model (after ``from_peft``) the checks run here and peft's own
    ``delete_adapter`` does the deleting."""
    model = distributed.unwrap(model)
    _refuse_sharded(model, "deleting an adapter")
    kind, configs = _owner(model, adapter_name)
    merged = _merged_where(model, adapter_name)
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights of {describe(merged)}: "
                         "unmerge it before deleting it; nothing was changed")
    if kind == "peft":
        model.delete_adapter(adapter_name)
        return model

    layers = [layer for _, layer in adapter_layers(model) if adapter_name in layer.adapter_names]
    wrappers = [w for _, w in _wrappers(model) if adapter_name in w.modules_to_save]
    active = _active_names(model)
    new_active = None
    if adapter_name in active:
        new_active = [n for n in active if n != adapter_name]
        if not new_active:
            rest = sorted(n for n in configs if n != adapter_name)
            new_active = rest[:1]
            if rest:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{rest[0]}.")

    # All checks passed: change the model.
    for layer in layers:
        layer.delete_adapter(adapter_name)
    for wrapper in wrappers:
        del wrapper.modules_to_save[adapter_name]  # where it was active, set_adapter below picks anew
    object.__setattr__(model, CONFIG_ATTR, {k: v for k, v in configs.items() if k != adapter_name})
    if new_active is not None:  # the deleted adapter was active: peft's choice, model-wide
        set_adapter(model, new_active)
    return model


# ----------------------------------------------------------------------------- add_weighted_adapter
def _config_rank(config) -> int:
    """peft's rank of an adapter for combinations: r, or the largest rank_pattern value."""
    pattern = getattr(config, "rank_pattern", None) or {}
    return max([config.r, *pattern.values()])


def _combined_targets(model: nn.Module, configs: list):
    """peft's target_modules of a combination: the union of lists, the alternation of regexes.
    fusedpeft's 'all-linear' (kept in the config, where peft stores the names it found) counts as
    the list of the layers it adapted."""
    from .inject import find_targets

    specs = []
    for config in configs:
        spec = config.target_modules
        if spec == "all-linear" or spec == ["all-linear"]:
            spec = sorted(find_targets(model, config))
        specs.append(spec)
    if all(s == specs[0] for s in specs):
        return specs[0]
    if all(isinstance(s, str) for s in specs):
        return "|".join(f"({s})" for s in specs)
    if all(isinstance(s, (list, tuple, set)) for s in specs):
        return sorted(set().union(*specs))
    raise ValueError("all adapter configs should follow the same target modules type: combining adapters whose "
                     "target_modules mix lists and regex strings is not supported (as in peft)")


def _as_floats(weights) -> list[float]:
    out = []
    for w in weights:
        number = isinstance(w, (int, float)) or (isinstance(w, torch.Tensor) and w.numel() == 1)
        if isinstance(w, bool) or not number:
            raise TypeError(f"weights must be real numbers, got {w!r}")
        w = float(w)
        if not math.isfinite(w):
            raise ValueError(f"weights must be finite, got {w!r}")
        out.append(w)
    return out


def _combine(layer: LoraLinear, sources: list[tuple[str, float]], combination_type: str, rank: int,
             svd_clamp, svd_full_matrices: bool, svd_driver) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A, B) of one layer, A: (k, in), B: (out, k) with k <= rank, computed in
    float32 (float64 for float64 adapters). The layer's new adapter has scaling 1."""
    ref = layer.lora_A[sources[0][0]].weight
    dt = torch.float64 if ref.dtype == torch.float64 else torch.float32
    As = [layer.lora_A[a].weight.detach().to(dt) for a, _ in sources]
    Bs = [layer.lora_B[a].weight.detach().to(dt) for a, _ in sources]
    ws = [w * float(layer.scaling[a]) for a, w in sources]  # weight times the source's scaling
    if combination_type == "cat":
        return torch.cat([A * w for A, w in zip(As, ws)], 0), torch.cat(Bs, 1)
    if combination_type == "linear":
        # peft: sqrt(|w s|) on both factors, the sign on A only (B A carries w s, whatever its sign).
        A = sum(math.copysign(math.sqrt(abs(w)), w) * A for A, w in zip(As, ws))
        B = sum(math.sqrt(abs(w)) * B for B, w in zip(Bs, ws))
        return A, B
    delta = sum(w * (B @ A) for A, B, w in zip(As, Bs, ws))  # (out, in)
    kwargs = {} if svd_driver is None else {"driver": svd_driver}
    U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, **kwargs)
    k = min(rank, S.numel())
    U, Vh = U[:, :k] * S[:k], Vh[:k]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    return Vh, U


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` combining LoRA ``adapters`` with ``weights`` (peft's
    ``LoraModel.add_weighted_adapter``), and return the model. With w_i the weight and s_i the
    scaling of adapter i in a layer (only the adapters the layer holds count there):

    - ``"linear"``: A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i; all
      adapters need the same rank (peft's rule; a rough approximation of the weighted sum);
    - ``"cat"``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: exactly
      sum_i w_i s_i B_i A_i, of rank sum_i r_i;
    - ``"svd"``: sum_i w_i s_i B_i A_i truncated by SVD to ``svd_rank`` (default: the largest
      rank), B = U S, A = V^T; ``svd_clamp`` clamps both to that quantile of their entries.

    A single adapter always combines as ``"linear"`` (as in peft). The new adapter's config is the
    first adapter's with r = lora_alpha = the new rank (so scaling 1), target_modules the union of
    theirs (lists) or the alternation of their regexes, no rank/alpha patterns; it arrives
    inactive, like any added adapter (:func:`fusedpeft.set_adapter` turns it on), and its
    modules_to_save copies start from the original modules, as in peft. peft's other combination
    types (ties, dare, magnitude_prune, ...) raise NotImplementedError; ``density`` and
    ``majority_sign_method`` only serve those.

    Deliberate differences from peft: an existing ``adapter_name`` raises (peft returns doing
    nothing); ``weights`` must match ``adapters`` in length; with ``use_rslora`` the new config has
    use_rslora=False (peft keeps it, which scales the combination by sqrt(new rank)); an init that
    rewrites base weights (pissa, olora) is not carried into the new config; where a layer's
    combination has fewer components than the new rank (an SVD of a small layer, a rank_pattern)
    it is zero-padded to the new rank (peft resizes or fails). Adapters with LoRA variants or
    lora_bias are refused.

    On a peft model (after ``from_peft``) the checks run here and peft's own
    ``add_weighted_adapter`` computes the adapter."""
    model = distributed.unwrap(model)
    _refuse_sharded(model, "adding a weighted adapter")
    if isinstance(adapters, str) or not all(isinstance(a, str) for a in adapters):
        raise TypeError(f"adapters must be a list of adapter names, got {adapters!r}")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters must name at least one adapter")
    weights = _as_floats(list(weights))
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weight(s) for {len(adapters)} adapter(s)")
    if combination_type not in _PEFT_COMBINATIONS:
        raise ValueError(f"invalid combination_type {combination_type!r}; peft's are {list(_PEFT_COMBINATIONS)}")
    if combination_type not in SUPPORTED_COMBINATIONS and len(adapters) > 1:  # one adapter: "linear", as peft
        raise NotImplementedError(f"combination_type {combination_type!r} is not implemented; fusedpeft combines "
                                  f"with {list(SUPPORTED_COMBINATIONS)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be an integer >= 1, got {svd_rank!r}")
    if svd_clamp is not None and not 0.0 <= float(svd_clamp) <= 1.0:
        raise ValueError(f"svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    kinds = {_owner(model, a)[0] for a in adapters}  # KeyError for an unknown adapter
    fused, peft_configs = _fused_configs(model), _peft_configs(model) or {}
    if adapter_name in fused or adapter_name in peft_configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if len(kinds) > 1:
        raise ValueError(f"adapters {adapters} mix fusedpeft-injected and peft adapters; combine adapters of one kind")
    configs = fused if kinds == {"fused"} else peft_configs
    not_lora = [a for a in adapters if _peft_type(configs[a]) != "LORA"]
    if not_lora:
        raise TypeError(f"add_weighted_adapter combines LoRA adapters only; {not_lora} are "
                        f"{sorted({_peft_type(configs[a]) for a in not_lora})}")
    if kinds == {"peft"}:
        fn = getattr(model, "add_weighted_adapter", None)
        if fn is None:
            raise TypeError(f"{type(model).__name__} has no peft add_weighted_adapter (pass the PeftModel)")
        fn(adapters, weights, adapter_name, combination_type=combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
           svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
           majority_sign_method=majority_sign_method)
        return model
    return _add_weighted_fused(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                               svd_full_matrices, svd_driver)


def _add_weighted_fused(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                        svd_full_matrices, svd_driver):
    configs = _fused_configs(model)
    sources = [configs[a] for a in adapters]
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [_config_rank(c) for c in sources]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type 'linear' needs adapters of one rank; {adapters} have ranks {ranks} "
                             "(use 'cat' or 'svd')")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    # Wrappers of modules_to_save that more than one of the adapters has: which copy would win?
    shared = [n for n, w in _wrappers(model) if sum(a in w.modules_to_save for a in dict.fromkeys(adapters)) > 1]
    if shared:
        raise ValueError(f"cannot combine adapters that have modules_to_save copies of the same module: "
                         f"{describe(shared)} (as in peft)")
    first = sources[0]
    changes = dict(r=new_rank, lora_alpha=new_rank, target_modules=_combined_targets(model, sources),
                   rank_pattern={}, alpha_pattern={}, use_rslora=False)
    init = getattr(first, "init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_REWRITING_INITS):
        changes["init_lora_weights"] = True
    new_config = dataclasses.replace(first, **changes)

    # Where the new adapter goes: a dry run of inject on a structural copy on the meta device.
    planned = planned_inject(model, new_config, adapter_name, f"cannot add the combined adapter {adapter_name!r}")
    plan = [(n, layer.r[adapter_name]) for n, layer in adapter_layers(planned) if adapter_name in layer.adapter_names]
    del planned

    results = {}
    for name, rank in plan:
        layer = model.get_submodule(name)
        present = [(a, w) for a, w in zip(adapters, weights)
                   if isinstance(layer, LoraLinear) and a in layer.lora_A]
        if not present:
            raise ValueError(f"{name} is a target of the combined adapter but holds none of {adapters} "
                             "(its targets come from the first adapter's exclude_modules and the union of targets)")
        odd = [a for a, _ in present if a in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(a)]
        if odd:
            raise NotImplementedError(f"{name}: adapters {odd} are LoRA variants or have lora_bias; "
                                      "add_weighted_adapter combines plain LoRA adapters only")
        layer_ranks = [layer.r[a] for a, _ in present]
        if combination_type == "linear" and len(set(layer_ranks)) != 1:
            raise ValueError(f"combination_type 'linear' needs one rank per layer; in {name} adapters "
                             f"{[a for a, _ in present]} have ranks {layer_ranks}")
        A, B = _combine(layer, present, combination_type, rank, svd_clamp, svd_full_matrices, svd_driver)
        if A.shape[0] > rank:  # cannot happen with the ranks above; a guard against a layer outgrowing its config
            raise ValueError(f"{name}: the combination has rank {A.shape[0]} above the new adapter's {rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{name}: the combination has non-finite values")
        results[name] = (A, B)

    # All checks passed: change the model.
    inject(model, new_config, adapter_name)
    with torch.no_grad():
        for name, (A, B) in results.items():
            layer = model.get_submodule(name)
            new_A, new_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            k = A.shape[0]
            new_A.zero_()
            new_B.zero_()
            new_A[:k].copy_(A)
            new_B[:, :k].copy_(B)
    return model


# ----------------------------------------------------------------------------- state dicts
def _peft_keys(model: nn.Module, adapter_name: str, state: dict) -> dict[str, str]:
    """{file key: model state_dict key} of a peft model's adapter, as peft's
    get_peft_model_state_dict selects and names them (matched back by tensor identity)."""
    from peft.utils import get_peft_model_state_dict

    selected = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name)
    by_id: dict[int, str] = {}
    for k, v in state.items():
        by_id.setdefault(id(v), k)
    out = {}
    for fk, v in selected.items():
        mk = by_id.get(id(v))
        if mk is None:
            raise NotImplementedError(f"peft's state dict of adapter {adapter_name!r} holds {fk}, which is no tensor "
                                      "of the model as it is")
        out[fk] = mk
    return out


def _adapter_keys(model: nn.Module, adapter_name: str) -> tuple[str, dict[str, str], dict]:
    """(kind, {file key: model key}, the model's state dict with keep_vars) of an adapter."""
    kind, _ = _owner(model, adapter_name)
    state = model.state_dict(keep_vars=True)
    keys = checkpoint_keys(model, adapter_name) if kind == "fused" else _peft_keys(model, adapter_name, state)
    return kind, keys, state


def _check_tensors(state_dict: Mapping, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{what} must be a mapping of key -> tensor, got {type(state_dict).__name__}")
    bad = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"{what} has values that are not tensors: {describe(bad)}")
    not_float = [k for k, v in state_dict.items() if not v.dtype.is_floating_point]
    if not_float:
        raise ValueError(f"{what} has tensors that are not floating point: {describe(not_float)}")
    return dict(state_dict)


def get_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` under the keys of peft's adapter files
    (``base_model.model.<module path>.lora_A.weight``, ...): the keys and values
    :func:`fusedpeft.save_adapter` writes, and what peft's ``get_peft_model_state_dict`` returns
    for the same model. As with ``state_dict()`` (and peft's function) the tensors are detached
    and share storage with the model's parameters: clone them to keep a snapshot.
    On a peft model (after ``from_peft``) this is peft's ``get_peft_model_state_dict``.

    On a model sharded by FSDP2 (``fully_shard``) the sharded tensors are gathered: every rank
    must call it, and every rank gets the full tensors (new ones, not the model's storage)."""
    model = distributed.unwrap(model)
    _, keys, state = _adapter_keys(model, adapter_name)
    out = {fk: state[mk].detach() for fk, mk in keys.items()}
    return distributed.full_tensors(out) if distributed.is_sharded(out.values()) else out


def set_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           adapter_name: str = "default") -> nn.Module:
    """Load ``state_dict`` (keys as :func:`get_adapter_state_dict` gives them, or as peft's
    ``get_peft_model_state_dict`` / an adapter file hold them) into the existing adapter
    ``adapter_name``, in place: the same Parameter objects get the values (cast to their dtype and
    device), without autograd; requires_grad, activity and config stay as they are.

    Every key the adapter has must be there (biases that ``config.bias`` trains may be left out,
    as :func:`fusedpeft.load_adapter` reads files), no other key, every shape equal: otherwise a
    ValueError names the missing, unexpected and mismatched keys, and nothing is changed. A merged
    adapter is refused (its unmerge would subtract the new weights; peft does not check this).

    On a model sharded by FSDP2 (``fully_shard``) every rank must call it with the full tensors:
    the checks run on every rank (a refusal on one raises on all, nothing changed) and rank 0's
    values are scattered into the shards."""
    model = distributed.unwrap(model)
    _, keys, state = _adapter_keys(model, adapter_name)
    if not distributed.is_sharded(state[mk] for mk in keys.values()):
        given = _check_state_dict(model, state_dict, adapter_name, keys, state)
    else:
        # A refusal on any rank is raised on every rank, before the collectives that fill the shards.
        error = given = None
        try:
            given = _check_state_dict(model, state_dict, adapter_name, keys, state)
        except Exception as e:  # noqa: BLE001  (raised by agree, on every rank)
            error = e
        distributed.agree(error, f"loading a state dict into adapter {adapter_name!r}")
    for fk in sorted(given):  # one order on every rank: a sharded target's copy is a collective
        distributed.copy_into(state[keys[fk]], given[fk])
    return model


def _check_state_dict(model, state_dict, adapter_name, keys, state) -> dict[str, torch.Tensor]:
    """set_adapter_state_dict's checks; the state dict as a dict."""
    given = _check_tensors(state_dict, "state_dict")
    merged = _merged_where(model, adapter_name)
    if merged:  # new weights under a merged adapter would make its unmerge corrupt the base weights
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights of {describe(merged)}: "
                         "unmerge it before loading new weights into it; nothing was changed")
    missing = [fk for fk, mk in keys.items() if fk not in given and not is_base_bias(mk)]
    unexpected = [k for k in given if k not in keys]
    mismatched = [f"{fk}: {tuple(t.shape)} given, {tuple(state[keys[fk]].shape)} expected"
                  for fk, t in given.items() if fk in keys and tuple(t.shape) != tuple(state[keys[fk]].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {describe(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(sorted(mismatched))}")
    if problems:
        raise ValueError(f"state dict does not fit adapter {adapter_name!r} ({'; '.join(problems)}); nothing was "
                         "changed")
    return given


# ----------------------------------------------------------------------------- hot-swapping
def _lora_scaling(config, module_path: str) -> float:
    """scaling of a LoRA config's adapter on one module (rank_pattern / alpha_pattern applied)."""
    r = _pattern_value(getattr(config, "rank_pattern", None) or {}, module_path, config.r)
    alpha = _pattern_value(getattr(config, "alpha_pattern", None) or {}, module_path, config.lora_alpha)
    return lora_scaling(r, alpha, getattr(config, "use_rslora", False))


def _module_path(file_key: str, suffix: str) -> str:
    path = file_key[: -len(suffix)] if file_key.endswith(suffix) else file_key
    return path[len(PREFIX):] if path.startswith(PREFIX) else path


def hotswap_adapter(model: nn.Module, source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                    adapter_name: str = "default", config=None) -> nn.Module:
    """Copy another adapter's weights into the existing adapter ``adapter_name`` IN PLACE (the same
    Parameter objects, their shapes, dtypes and requires_grad unchanged), so an optimizer, or a
    ``torch.compile``'d model, sees the new adapter without re-tracing (peft's
    ``hotswap_adapter``). ``source``: an adapter directory in peft's format (read and checked as
    :func:`fusedpeft.load_adapter` reads it), or a state dict keyed as
    :func:`get_adapter_state_dict` gives it; ``config``, for a state dict only, is its adapter's
    config (default: the model adapter's own config).

    The new adapter must be of the same method and target the adapter's modules: a key of a
    module the adapter lacks is refused. For LoRA (as in peft): a module the new adapter leaves out
    gets zero A and B (the base output there); lora_dropout must be equal; a rank below the
    allocated one is zero-padded into the first rows of A and columns of B, a larger one is
    refused. The layers' scaling numbers are never changed (a compiled graph holds them as
    constants): the ratio of the new scaling (from the new config's r / lora_alpha / patterns /
    use_rslora) to the allocated one is folded into B (and lora_B's bias), so the layer computes
    exactly new_scaling * B_new A_new. The adapter keeps its config, in which the swapped weights
    are expressed: ``save_adapter`` afterwards writes a file that reproduces the swapped outputs.
    peft instead turns the scalings into tensors (``prepare_model_for_compiled_hotswap``) and pads
    the allocated rank ahead of time; here allocate the largest rank when injecting the first
    adapter. IA3 and SSF adapters (fusedpeft-injected) swap tensors of equal shapes.

    Everything is checked first: a refused swap raises (ValueError naming the module and the
    shapes) and leaves the model as it was. A merged adapter is refused (unmerge first)."""
    model = distributed.unwrap(model)
    _refuse_sharded(model, "hot-swapping")
    kind, configs = _owner(model, adapter_name)
    current = configs[adapter_name]
    if isinstance(source, (str, os.PathLike)):
        if config is not None:
            raise ValueError("config is for a state-dict source; an adapter directory holds its own config")
        directory = os.fspath(source)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"adapter directory {directory!r} does not exist")
        new_config = _read_config(directory)
        weights = _read_weights(directory)
        what = f"the adapter in {directory!r}"
    elif isinstance(source, Mapping):
        new_config = current if config is None else config
        weights = source
        what = "the state dict"
    else:
        raise TypeError(f"source must be an adapter directory or a state dict, got {type(source).__name__}")
    weights = _check_tensors(weights, what)
    method = _peft_type(current)
    if _peft_type(new_config) != method:
        raise ValueError(f"adapter {adapter_name!r} is {method} but {what} is {_peft_type(new_config)}")
    if kind == "peft" and method != "LORA":
        raise NotImplementedError(f"hot-swapping a peft model's {method} adapter is not supported (LoRA only, as peft)")
    lora = method == "LORA"
    if lora and float(getattr(current, "lora_dropout", 0.0)) != float(getattr(new_config, "lora_dropout", 0.0)):
        raise ValueError(f"{what} has lora_dropout={new_config.lora_dropout}, adapter {adapter_name!r} has "
                         f"{current.lora_dropout}: hot-swapping keeps the adapter's dropout (as peft, it must match)")
    merged = _merged_where(model, adapter_name)
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights of {describe(merged)}: "
                         "unmerge it before hot-swapping")
    _, keys, state = _adapter_keys(model, adapter_name)
    unexpected = [k for k in weights if k not in keys]
    if unexpected:
        raise ValueError(f"{what} has keys adapter {adapter_name!r} does not have (another module, or another "
                         f"method): {describe(unexpected)}; hot-swapping cannot add modules")

    # The LoRA layers holding the adapter, by their parameters.
    owner: dict[int, tuple[str, LoraLinear, str]] = {}
    for lname, layer in model.named_modules():
        if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A:
            owner[id(layer.lora_A[adapter_name].weight)] = (lname, layer, "A")
            owner[id(layer.lora_B[adapter_name].weight)] = (lname, layer, "B")
            bias = getattr(layer.lora_B[adapter_name], "bias", None)
            if bias is not None:
                owner[id(bias)] = (lname, layer, "b")
        elif kind == "peft" and not isinstance(layer, AdapterLayer) and any(
                adapter_name in (getattr(layer, attr, None) or {})
                for attr in ("lora_A", "lora_embedding_A", "lora_magnitude_vector")):
            raise NotImplementedError(f"{lname} is a peft layer fusedpeft did not swap ({type(layer).__name__}): "
                                      "hot-swap this model with peft.utils.hotswap instead")

    plan: list[tuple[torch.Tensor, Optional[torch.Tensor], float]] = []  # (target, value or None: zero, factor)
    lora_layers: dict[str, dict] = {}
    plain_missing = []
    for fk, mk in keys.items():
        param = state[mk]
        hit = owner.get(id(param))
        if hit is None:
            if fk in weights:
                t = weights[fk]
                if tuple(t.shape) != tuple(param.shape):
                    raise ValueError(f"{fk}: {what} has shape {tuple(t.shape)}, the model's tensor is "
                                     f"{tuple(param.shape)}; nothing was changed")
                plan.append((param, t, 1.0))
            elif not is_base_bias(mk):
                plain_missing.append(fk)
            continue
        lname, layer, part = hit
        entry = lora_layers.setdefault(lname, {"layer": layer, "keys": {}})
        entry["keys"][part] = fk
    if plain_missing:
        raise ValueError(f"{what} is missing keys of adapter {adapter_name!r}: {describe(plain_missing)}; "
                         "nothing was changed")

    for lname, entry in lora_layers.items():
        layer, parts = entry["layer"], entry["keys"]
        if adapter_name in getattr(layer, "lora_variant", {}):
            raise NotImplementedError(f"{lname}: adapter {adapter_name!r} is a LoRA variant; hot-swapping handles "
                                      "plain LoRA")
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        b = getattr(layer.lora_B[adapter_name], "bias", None)
        present = {p: fk in weights for p, fk in parts.items()}
        if not any(present.values()):  # left out: the layer runs as the base (peft's rule)
            plan += [(A, None, 0.0), (B, None, 0.0)] + ([(b, None, 0.0)] if b is not None else [])
            continue
        if not (present["A"] and present["B"]) or (b is not None and not present.get("b", False)):
            have = sorted(parts[p] for p, there in present.items() if there)
            lack = sorted(parts[p] for p, there in present.items() if not there)
            raise ValueError(f"{lname}: {what} has {have} but not {lack}; nothing was changed")
        new_A, new_B = weights[parts["A"]], weights[parts["B"]]
        rank = A.shape[0]
        ok = (new_A.dim() == 2 and new_B.dim() == 2 and new_A.shape[1] == A.shape[1] and new_B.shape[0] == B.shape[0]
              and new_A.shape[0] == new_B.shape[1] and 1 <= new_A.shape[0] <= rank)
        if not ok:
            raise ValueError(
                f"{lname}: cannot hot-swap lora_A {tuple(new_A.shape)} / lora_B {tuple(new_B.shape)} into adapter "
                f"{adapter_name!r}'s lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} (rank {rank}): the new rank "
                "must be at most the allocated one, in and out features equal; nothing was changed")
        if b is not None and tuple(weights[parts["b"]].shape) != tuple(b.shape):
            raise ValueError(f"{lname}: lora_B bias of shape {tuple(weights[parts['b']].shape)}, the model's is "
                             f"{tuple(b.shape)}; nothing was changed")
        old_scaling = float(layer.scaling[adapter_name])
        new_scaling = _lora_scaling(new_config, _module_path(parts["A"], ".lora_A.weight"))
        if old_scaling == 0.0:
            if new_scaling != 0.0:
                raise ValueError(f"{lname}: adapter {adapter_name!r} has scaling 0, which no weights can rescale to "
                                 f"the new adapter's {new_scaling}")
            factor = 0.0
        else:
            factor = new_scaling / old_scaling
        plan += [(A, new_A, 1.0), (B, new_B, factor)] + ([(b, weights[parts["b"]], factor)] if b is not None else [])

    # All checks passed: change the model, in place.
    with torch.no_grad():
        for target, value, factor in plan:
            if value is None:
                target.zero_()
                continue
            if factor != 1.0:
                dt = torch.float64 if value.dtype == torch.float64 or target.dtype == torch.float64 else torch.float32
                value = value.to(dt) * factor
            if tuple(value.shape) == tuple(target.shape):
                target.copy_(value)
            elif value.shape[0] < target.shape[0]:  # lora_A of a smaller rank: its first rows
                target.zero_()
                target[: value.shape[0]].copy_(value)
            else:  # lora_B of a smaller rank: its first columns
                target.zero_()
                target[:, : value.shape[1]].copy_(value)
    return model
