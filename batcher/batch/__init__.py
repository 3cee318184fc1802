"""Batch API mode's parts: the Files/Batches client, chunks of requests, their state journal,
and results read back from output and error files."""
