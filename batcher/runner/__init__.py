"""A whole run set up and summed up: runner, progress, statistics."""
