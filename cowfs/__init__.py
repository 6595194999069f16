"""cowfs: mount a directory of disk images as disposable, writable copies."""

__version__ = "0.1.0"
