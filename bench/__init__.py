"""cowfs's benchmark: `make bench`, or `python -m bench --help` from the project root (see README.md here)."""
