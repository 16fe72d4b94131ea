"""probes: train linear and attentive layer-fusion heads on stored tokens (arrays + labels only)."""
from .errors import ProbeError
from .features import FeatureSet, check_compatible
from .fit import FittedProbe, fit
from .heads import HEADS, Head, head_spec, supported_heads
from .protocol import PROTOCOLS, Protocol, resolve_protocol
from .selection import TokenSpec, resolve_layers

__all__ = ["FeatureSet", "FittedProbe", "HEADS", "Head", "PROTOCOLS", "ProbeError", "Protocol", "TokenSpec",
           "check_compatible", "fit", "head_spec", "resolve_layers", "resolve_protocol", "supported_heads"]
