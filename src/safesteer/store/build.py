"""The extract stage: the configured datasets through the backbone into an activation store."""

from __future__ import annotations
