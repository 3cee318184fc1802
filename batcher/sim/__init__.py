"""The built-in OpenAI-compatible simulator (optional: imports the core, never imported by it)."""
