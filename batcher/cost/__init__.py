"""Prices, token counts, the budget cap and the pre-flight estimate."""
