"""Sessions and users: the store (Redis or in-process), its records and the `_session` routes."""
