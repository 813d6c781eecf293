"""Serving many adapters on one base model: one adapter per sequence of a batch, from a bank of
fixed device slots (``MultiAdapterModel``). See ``model.py`` for the API, ``bank.py`` for the host
store, slot table and copies, ``layers.py`` for the per-layer slots and the row index, and
``demo.py`` for ``python -m fusedpeft serve-demo``."""
from .bank import BASE, AdapterBank, HostAdapter, SlotTable
from .layers import BatchIndex, MultiIA3Linear, MultiLoraLinear
from .model import MultiAdapterModel

__all__ = ["BASE", "AdapterBank", "BatchIndex", "HostAdapter", "MultiAdapterModel", "MultiIA3Linear",
           "MultiLoraLinear", "SlotTable"]
