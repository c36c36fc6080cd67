"""Ray job entrypoints: thin wrappers, submitted with `ray job submit --working-dir . -- python -m jobs.X`."""
