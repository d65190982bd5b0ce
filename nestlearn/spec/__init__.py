"""Spec schema, YAML loading with source positions, overrides and JSON-schema export."""

from nestlearn.spec.errors import SpecError, SpecIssue
from nestlearn.spec.schema import Spec

__all__ = ["Spec", "SpecError", "SpecIssue"]
