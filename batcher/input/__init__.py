"""Reading input: JSONL lines into requests and rejects."""
