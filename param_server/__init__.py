"""param_server package."""
