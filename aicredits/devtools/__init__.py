"""Development tools: local stand-ins for outside services, for development and tests."""
