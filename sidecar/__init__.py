"""OpenID Connect auth sidecar: a reverse proxy that gives a sync service login."""

__version__ = "0.1.0"
