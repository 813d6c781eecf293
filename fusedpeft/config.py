"""Adapter configs. Field names and meanings follow HF peft's LoraConfig / IA3Config so that a
peft config (or its adapter_config.json) translates one to one. SSFConfig, which peft lacks, is
built the same way. Each config class is one method's record in ``fusedpeft.methods``, which also
reads adapter_config.json dicts back into configs (``config_from_dict``)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

TargetSpec = Optional[Union[str, list, tuple, set]]


def _as_spec(value):
    # JSON gives lists, peft stores sets; keep strings (regexes) as they are.
    if value is None or isinstance(value, str):
        return value
    return sorted(set(value))


@dataclass
class _AdapterConfig:
    """What every method shares: which modules to adapt and which to train as whole copies."""

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

    # --- serialisation (adapter_config.json in peft's format) -----------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "_AdapterConfig":
        """Build from a peft adapter_config.json dict; keys peft has and we do not use are dropped."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class LoraConfig(_AdapterConfig):
    """LoRA: y = x W^T + b + scaling * (dropout(x) A^T) B^T with A: (r, in), B: (out, r).

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (as in peft).
    init_lora_weights: True (A kaiming-uniform, B zero: the adapter starts as a no-op),
    "gaussian" (A ~ N(0, 1/r), B zero), or False (both random; for tests only).
    rank_pattern / alpha_pattern map a module-name regex to a per-module r / lora_alpha.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "LORA"
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        for name, r in self.rank_pattern.items():
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"rank_pattern[{name!r}] must be an integer >= 1, got {r!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """r and lora_alpha for one module, after rank_pattern / alpha_pattern."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / (r**0.5) if self.use_rslora else alpha / r


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

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "SSF"
        check_ssf_init(self.init_ssf_weights, "SSFConfig.init_ssf_weights")


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

