"""The run registry: a SQLite store of runs, metrics, checkpoints and events."""
