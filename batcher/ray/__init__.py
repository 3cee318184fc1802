"""``--engine ray``: the run spread over a Ray cluster (optional: imports the core)."""
