"""The configured databases at run time: upstream URL, cookie name and providers of each."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sidecar.config import DatabaseConfig, OIDCConfig, Settings
from sidecar.errors import NotFound, outside_text
from sidecar.oidc.provider import ProviderRegistry


@dataclass(slots=True)
class Database:
    name: str
    config: DatabaseConfig
    upstream: str  # base URL; the request's raw path and query are appended unchanged
    providers: ProviderRegistry | None

    @property
    def cookie_name(self) -> str:
        return self.config.session_cookie_name


class Databases:
    """Looks databases up by name; an unknown one is a 404, as in Sync Gateway."""

    def __init__(self, items: dict[str, Database]) -> None:
        self._items = items

    def get(self, name: str) -> Database:
        try:
            return self._items[name]
        except KeyError:
            # Security: the name comes from the request path; quoted as plain text only.
            raise NotFound(f"no such database {outside_text(name, limit=64)!r}") from None

    def __iter__(self) -> Iterator[Database]:
        return iter(self._items.values())

    def registries(self) -> Iterator[ProviderRegistry]:
        return (db.providers for db in self._items.values() if db.providers is not None)

    @classmethod
    def build(
        cls,
        settings: Settings,
        make_registry: Callable[[OIDCConfig], ProviderRegistry],
        upstream_override: str | None = None,
    ) -> Databases:
        items = {}
        for name, conf in settings.databases.items():
            upstream = conf.upstream or settings.upstream or upstream_override
            if upstream is None:  # config validation guarantees one unless demo_upstream
                raise ValueError(f"databases.{name}: no upstream")
            registry = make_registry(conf.oidc) if conf.oidc is not None else None
            items[name] = Database(name, conf, upstream.rstrip("/"), registry)
        return cls(items)
