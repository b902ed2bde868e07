"""Process state: listening (set by whoever starts the listener), draining on SIGTERM (which
readiness reports)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(slots=True)
class Lifecycle:
    draining: bool = False
    # Set once the public listener accepts connections: the built-in test provider is fetched
    # from this very process, and asking before would only log a failure (app._resources).
    listening: asyncio.Event = field(default_factory=asyncio.Event)
