from .base import AdapterLayer, ModulesToSaveWrapper, is_conv1d, linear_shape
from .ia3 import IA3Linear
from .lora import LoraLinear

__all__ = ["AdapterLayer", "IA3Linear", "LoraLinear", "ModulesToSaveWrapper", "is_conv1d", "linear_shape"]
