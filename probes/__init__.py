"""probes: train linear and attentive layer-fusion heads on stored tokens (arrays + labels only)."""
from .errors import ProbeError
from .features import FeatureSet, check_compatible
from .selection import TokenSpec, resolve_layers
from .train import GRIDS, HEADS, FittedProbe, Grid, fit, head_spec, supported_heads

__all__ = ["FeatureSet", "FittedProbe", "GRIDS", "Grid", "HEADS", "ProbeError", "TokenSpec", "check_compatible",
           "fit", "head_spec", "resolve_layers", "supported_heads"]
