"""Process state that readiness reports: draining on SIGTERM."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Lifecycle:
    draining: bool = False
