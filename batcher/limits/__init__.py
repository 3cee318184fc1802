"""Rate limits: RPM/TPM meters, adaptive concurrency, 429s, limits remembered between runs."""
