"""What one request asked for: the policy snapshot it is served with (or none) and its α."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable

from safesteer.serve.policies import PolicyRecord

if TYPE_CHECKING:  # annotation only: engine imports this module
    from safesteer.serve.engine import CompiledPolicy


@dataclass
class Plan:
    """What one request asked for: a policy snapshot (or none) and the α to use."""

    record: PolicyRecord | None = None
    alpha: float | None = None

    @property
    def compiled(self) -> CompiledPolicy | None:
        return None if self.record is None else self.record.runtime

    def key(self) -> Hashable:
        return (None, None) if self.record is None else (id(self.record), self.alpha)

    def describe(self) -> dict[str, Any]:
        if self.record is None:
            return {"policy": None, "policy_version": None, "alpha": None}
        return {"policy": self.record.name, "policy_version": self.record.version, "alpha": self.alpha}
