"""HTTP routers of the registry, one per concern."""
