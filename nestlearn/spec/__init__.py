"""Spec schema, YAML loading with source positions, overrides and JSON-schema export.

    spec = parse_spec(text, "my.yaml", overrides=["model.dim=64"])   # or load_spec(path, ...)

The modules, in the order a spec goes through them: ``document`` (YAML with positions),
``overrides`` (profiles and ``path=value`` overrides), ``messages`` (validation against
``schema``, errors worded for a user, with the help of ``walk``), ``positions`` (kept with the
returned spec for later checks); ``loader`` ties them together. Importing this package does not
import torch.
"""

from nestlearn.spec.errors import SpecError, SpecIssue, suggest
from nestlearn.spec.loader import load_spec, parse_spec, profile_names, spec_json_schema
from nestlearn.spec.overrides import NO_PROFILE, apply_overrides, profile_overrides
from nestlearn.spec.positions import attach_source, issue_at, locate, source_map
from nestlearn.spec.schema import Spec

__all__ = [
    "Spec", "SpecError", "SpecIssue", "suggest", "load_spec", "parse_spec", "profile_names", "spec_json_schema",
    "NO_PROFILE", "apply_overrides", "profile_overrides", "attach_source", "issue_at", "locate", "source_map",
]
