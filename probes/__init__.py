"""probes: train linear and attentive layer-fusion heads on stored tokens (arrays + labels only).

The names below are loaded on first use, so importing a light submodule (the head registry, the protocols)
does not import torch.
"""
from importlib import import_module

_WHERE = {"FeatureSet": "features", "check_compatible": "features", "FittedProbe": "fitting", "fit": "fitting",
          "HEADS": "heads", "Head": "heads", "head_spec": "heads", "supported_heads": "heads",
          "PROTOCOLS": "protocol", "Protocol": "protocol", "resolve_protocol": "protocol",
          "TokenSpec": "selection", "resolve_layers": "selection", "ProbeError": "errors"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probes' has no attribute '{name}'")
