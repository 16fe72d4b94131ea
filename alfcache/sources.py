"""Where a model comes from, parsed once: a registry short name, `timm:<id>`, `hf:<transformers id or folder>`,
`local-dir:<timm folder>` or a plain path to a timm folder (timm's own `save_for_hf` layout).

Every other module asks this one for the kind of source, the identifier to load and the name a store records;
no other module looks at prefixes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import AlfError
from .registry import MODELS, lookup

MAX_NAME = 300  # longer model names are refused up front (no path or hub id is that long)
KINDS = ("registry", "timm", "hf", "local-dir")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # registry | timm | hf | local-dir
    spec: str  # as the user typed it
    ident: str  # registry short name | timm id | transformers hub id or absolute folder | absolute timm folder

    @property
    def local(self) -> Path | None:
        """The folder the weights come from, for local sources."""
        if self.kind == "local-dir" or (self.kind == "hf" and Path(self.ident).is_absolute()):
            return Path(self.ident)
        return None

    @property
    def name(self) -> str:
        """The model name a store records and its folder is named after."""
        if self.kind == "registry":
            return self.ident
        if self.kind == "timm":
            return f"timm:{self.ident}"
        if self.kind == "hf":
            return f"hf-local-{Path(self.ident).name}" if self.local else f"hf:{self.ident}"
        return f"local-{Path(self.ident).name}"

    @property
    def source_id(self) -> str:
        """The resolved identity of the weights' origin (recorded in the store; what pairing compares)."""
        if self.kind == "registry":
            return MODELS[self.ident].timm_id
        if self.kind == "timm":
            return self.ident
        if self.kind == "hf":
            return f"hf:{self.ident}"
        return f"local-dir:{self.ident}"


def parse_model(spec: str) -> ModelSource:
    """Parse a model argument; unknown names and malformed values fail in one line."""
    if not isinstance(spec, str) or not spec.strip():
        raise AlfError("empty model name (see `alf models`)")
    if len(spec) > MAX_NAME:
        raise AlfError(f"model name of {len(spec)} characters is too long (at most {MAX_NAME}); see `alf models`")
    if spec.startswith("hf:"):
        ident = spec[3:]
        if not ident:
            raise AlfError("empty transformers model id after 'hf:'")
        p = Path(ident).expanduser()
        return ModelSource("hf", spec, str(p.resolve()) if p.is_dir() else ident)
    if spec.startswith("timm:"):
        ident = spec[5:]
        if not ident:
            raise AlfError("empty timm model id after 'timm:'")
        return ModelSource("timm", spec, ident)
    if spec.startswith("local-dir:"):
        p = Path(spec[len("local-dir:"):]).expanduser()
        if not (p / "config.json").is_file():
            raise AlfError(f"model folder '{p}' has no config.json (expected timm's save_for_hf layout)")
        return ModelSource("local-dir", spec, str(p.resolve()))
    if spec in MODELS:
        return ModelSource("registry", spec, spec)
    p = Path(spec).expanduser()
    if (p / "config.json").is_file():
        return ModelSource("local-dir", spec, str(p.resolve()))
    lookup(spec)  # raises the one-line 'unknown model' error with suggestions
    raise AssertionError("unreachable")
