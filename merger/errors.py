"""Errors raised while loading and merging experts; each is shown to users as one clear line."""

from __future__ import annotations

from core.types import DiffGraphError


class MergeError(DiffGraphError):
    """Something about the requested merge cannot be done (missing base, bad coefficient, ...)."""


class UnsafeFormat(MergeError):
    """A weight file needs unpickling and that was not allowed (or it holds more than tensors)."""


class CorruptWeights(MergeError):
    """A weight file is truncated, has a malformed header, or is not a weight file at all."""


class IncompatibleExpert(MergeError):
    """An expert does not fit the base: another family, or a tensor whose name or shape differs."""
