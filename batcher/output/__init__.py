"""What a run leaves: journal, output files, provenance, resume plan, reports."""
