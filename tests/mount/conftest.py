"""Fixtures of the mount tests that act as other users (see users.py)."""

from .users import cowfs_for_others, visible_tmp

__all__ = ["cowfs_for_others", "visible_tmp"]
