from .base import AdapterLayer, ModulesToSaveWrapper, is_conv1d, linear_shape
from .ia3 import IA3Linear
from .lora import LoraLinear, LoraVariant
from .lora_embedding import LoraEmbedding
from .ssf import SSFLinear

__all__ = ["AdapterLayer", "IA3Linear", "LoraEmbedding", "LoraLinear", "LoraVariant", "ModulesToSaveWrapper", "SSFLinear", "is_conv1d", "linear_shape"]
