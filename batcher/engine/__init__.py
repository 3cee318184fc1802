"""The concurrent core: dispatch, attempts with retries, re-asks, recording."""
