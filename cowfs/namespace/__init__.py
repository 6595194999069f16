"""The directory view of a mount: base entries plus what the mount changed.

A package of four owners, each the only writer of its part (each module opens with its rule):
  * `nodes`      -- the node table: which nodes exist, inode numbers, the index by base path;
  * `names`      -- directory entries, node links and link counts (the name <-> node relation);
  * `operations` -- `Namespace`, the filesystem operations the FUSE adapter calls;
  * `reset`      -- throwing changes away: reset and commit adoption (the reset specification);
and `model`, the records they share.  The core raises ``OSError`` for FUSE and `Refused`
for the control channel; it knows neither FUSE nor the control protocol.
"""

from .model import ROOT_INO, WHITEOUT, Attrs, Invalidation, Node, Place, Refused, Stat, StillOpen
from .nodes import InoRange
from .operations import RENAME_EXCHANGE, RENAME_NOREPLACE, Namespace
from .reset import change_token, identity_dict, refuse_extra_links, split_mount_path

__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_INO",
    "WHITEOUT",
    "Attrs",
    "InoRange",
    "Invalidation",
    "Namespace",
    "Node",
    "Place",
    "Refused",
    "Stat",
    "StillOpen",
    "change_token",
    "identity_dict",
    "refuse_extra_links",
    "split_mount_path",
]
