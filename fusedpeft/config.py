"""Adapter configs. Field names and meanings follow HF peft's LoraConfig / IA3Config so that a
peft config (or its adapter_config.json) translates one to one. SSFConfig, which peft lacks, is
built the same way. Each config class is one method's record in ``fusedpeft.methods``, which also
reads adapter_config.json dicts back into configs (``config_from_dict``)."""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

TargetSpec = Optional[Union[str, list, tuple, set]]


def _as_spec(value):
    # JSON gives lists, peft stores sets; keep strings (regexes) as they are.
    if value is None or isinstance(value, str):
        return value
    return sorted(set(value))


# adapter_config.json keys that do not change what an adapter computes: peft's bookkeeping, and
# the configs of inits whose values the file's tensors replace.
BOOKKEEPING_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "peft_version", "megatron_config", "megatron_core", "use_qalora", "qalora_group_size",
    "ensure_weight_tying", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
})


@dataclass
class _AdapterConfig:
    """What every method shares: which modules to adapt and which to train as whole copies.

    target_modules None: the architecture's default targets (``fusedpeft.target_defaults``, as
    peft's table), resolved when the adapter is injected. LoRA and SSF also take
    layers_to_transform (an int or a list of ints): only the targets inside those layer indices,
    where the index is the number after ``<layers_pattern>.`` in the module's name (any
    ``<name>.<number>.`` when layers_pattern is None), as peft reads them; a target named exactly
    in target_modules is kept whatever its layer. (peft's IA3Config has neither field.)"""

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list] = None

    peft_type: str = field(default="", init=False)

    def __post_init__(self):
        self.target_modules = _as_spec(self.target_modules)
        self.exclude_modules = _as_spec(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def _check_layers(self):
        """Normalise and check layers_to_transform / layers_pattern (the configs that have them)."""
        name = type(self).__name__
        if isinstance(self.layers_to_transform, (list, tuple)):
            self.layers_to_transform = list(self.layers_to_transform)
        layers = self.layers_to_transform
        if layers is not None and not (
                (isinstance(layers, int) and not isinstance(layers, bool))
                or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
            raise ValueError(f"{name}.layers_to_transform must be an int or a list of ints, got {layers!r}")
        if isinstance(self.layers_pattern, (list, tuple)):
            self.layers_pattern = list(self.layers_pattern)
        if isinstance(self.target_modules, str) and (layers is not None or self.layers_pattern is not None):
            raise ValueError(f"{name}: layers_to_transform and layers_pattern cannot be used when target_modules "
                             "is a regex string")
        if self.layers_pattern and layers is None:
            raise ValueError(f"{name}: layers_pattern needs layers_to_transform")

    def in_layers(self, module_name: str) -> bool:
        """Whether ``module_name`` lies in layers_to_transform (True when the config has none)."""
        indices = getattr(self, "layers_to_transform", None)
        if indices is None or indices == []:
            return True
        patterns = self.layers_pattern
        if not patterns:
            found = re.match(r".*?\.[^.]*\.(\d+)\.", module_name)
        else:
            found = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module_name)
                if found:
                    break
        if found is None:
            return False
        index = int(found.group(1))
        return index == indices if isinstance(indices, int) else index in indices

    # --- serialisation (adapter_config.json in peft's format) -----------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "_AdapterConfig":
        """Build from a peft adapter_config.json dict. A peft feature fusedpeft does not implement
        (``use_dora``, ``layer_replication``, ...: the method's record in fusedpeft.methods names
        them) is refused when set; peft's bookkeeping keys are dropped; any other key a config
        does not have is dropped with a warning naming it (when its value is set)."""
        from . import methods

        method = methods.for_config_class(cls)
        bad = [f"{k}={data[k]!r}" for k in method.variant_keys + method.unsupported_keys if data.get(k)]
        if bad:
            raise ValueError(f"{cls.__name__}: peft features fusedpeft does not implement: {', '.join(bad)}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k, v in data.items() if k not in names and k not in BOOKKEEPING_KEYS
                         and k not in method.variant_keys + method.unsupported_keys and v)
        if unknown:
            warnings.warn(f"{cls.__name__}.from_dict: ignoring keys fusedpeft does not know: {unknown}")
        return cls(**{k: v for k, v in data.items() if k in names})


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """LoRA's scaling of the update B A: alpha / r, or alpha / sqrt(r) with rsLoRA (peft's formula)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraConfig(_AdapterConfig):
    """LoRA: y = x W^T + b + scaling * ((dropout(x) A^T) B^T + b_B) with A: (r, in), B: (out, r)
    and b_B: (out,) only with lora_bias (a trainable bias on lora_B, zero at start, as peft's).

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (as in peft).
    init_lora_weights: True (A kaiming-uniform, B zero: the adapter starts as a no-op),
    "gaussian" (A ~ N(0, 1/r), B zero), False (both random; for tests only), or peft's inits that
    start from the base weight W (out, in) and leave the layer's output unchanged by rewriting W
    to the residual W - scaling B A: "pissa" (B A the top-r part of W's SVD, split as
    B = U_r sqrt(S_r / scaling), A = sqrt(S_r / scaling) V_r^T), "pissa_niter_<n>" (the same from
    a randomised SVD with n subspace iterations), "olora" (B, A = Q_r, R_r of W's QR).
    rank_pattern / alpha_pattern map a module-name regex to a per-module r / lora_alpha.
    use_dora: DoRA (fusedpeft.ops.dora_linear): each output row of W + s B A rescaled to a learned
    length m, which starts at that row's norm (linear targets only).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    lora_bias: bool = False
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    use_dora: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "LORA"
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if self.use_dora and self.lora_bias:
            raise ValueError("LoraConfig: use_dora together with lora_bias is not implemented")
        self._check_layers()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not is_lora_init(self.init_lora_weights):
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>' or "
                f"'olora', got {self.init_lora_weights!r}"
            )
        if not isinstance(self.lora_bias, bool):
            raise ValueError(f"LoraConfig.lora_bias must be True or False, got {self.lora_bias!r}")
        for name, r in self.rank_pattern.items():
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"rank_pattern[{name!r}] must be an integer >= 1, got {r!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """r and lora_alpha for one module, after rank_pattern / alpha_pattern."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        return lora_scaling(r, alpha, self.use_rslora)


@dataclass
class IA3Config(_AdapterConfig):
    """IA3: learned rescaling. Ordinary targets scale the output, (x W^T + b) * l; targets that are
    also in feedforward_modules scale the input, (x * l) W^T + b. init_ia3_weights=True starts
    every l at one (a no-op); False draws them at random (for tests)."""

    feedforward_modules: TargetSpec = None
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "IA3"
        self.feedforward_modules = _as_spec(self.feedforward_modules)
        if (
            isinstance(self.feedforward_modules, list)
            and isinstance(self.target_modules, list)
            and not set(self.feedforward_modules) <= set(self.target_modules)
        ):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            raise ValueError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}")

    def is_feedforward(self, module_name: str) -> bool:
        return self.feedforward_modules is not None and matches(self.feedforward_modules, module_name)


@dataclass
class SSFConfig(_AdapterConfig):
    """SSF (scale-shift fine-tuning, Lian et al. 2022): a learned per-output-channel affine map
    after each target, (x W^T + b) * scale + shift, scale and shift of shape (out_features,).
    init_ssf_weights: True (scale one, shift zero: the adapter starts as a no-op), "ssf" (the
    paper's init: scale ~ N(1, 0.02), shift ~ N(0, 0.02)), or False (both clearly random; for
    tests only). peft has no SSF: fusedpeft writes its own adapter files (see fusedpeft.io)."""

    init_ssf_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "SSF"
        self._check_layers()
        check_ssf_init(self.init_ssf_weights, "SSFConfig.init_ssf_weights")


def is_lora_init(value) -> bool:
    """The init_lora_weights values fusedpeft computes (see LoraConfig)."""
    if isinstance(value, bool):
        return True
    return value in ("gaussian", "pissa", "olora") or (
        isinstance(value, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", value) is not None)


def check_ssf_init(value, what: str):
    # isinstance first: 1 == True and 0 == False would pass a plain `in` test.
    if not (isinstance(value, bool) or value == "ssf"):
        raise ValueError(f"{what} must be True, False or 'ssf', got {value!r}")


def matches(spec: TargetSpec, module_name: str) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list matches a name
    equal to an entry or ending in '.' + entry."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return any(module_name == key or module_name.endswith("." + key) for key in spec)


def _pattern_value(patterns: dict, module_name: str, default):
    # peft matches pattern keys as regexes anchored at a name boundary and at the end.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default

