"""Adapter files: HF peft's on-disk format (adapter_config.json + adapter_model.safetensors), and
fusedpeft's own format for SSF in the same layout."""
from .hf_checkpoint import from_pretrained
from .peft_format import adapter_config_dict, checkpoint_keys, load_adapter, save_adapter

__all__ = ["adapter_config_dict", "checkpoint_keys", "from_pretrained", "load_adapter", "save_adapter"]
