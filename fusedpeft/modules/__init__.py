from .base import AdapterLayer, ModulesToSaveWrapper, is_conv1d, linear_shape
from .ia3 import IA3Linear
from .lora import LoraLinear
from .ssf import SSFLinear

__all__ = ["AdapterLayer", "IA3Linear", "LoraLinear", "ModulesToSaveWrapper", "SSFLinear", "is_conv1d", "linear_shape"]
