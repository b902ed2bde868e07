"""OpenID Connect relying-party pieces: providers, ID token validation, the code flow."""
