"""Ratchet's serving side: engines, the HTTP API, the CLI; it composes the other packages."""
