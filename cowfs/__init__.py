"""cowfs: mount a directory of disk images as disposable, writable copies."""

from .api import FileDiff, Mount, Status, attach, mount
from .errors import UserError
from .protocol import FileChange

__version__ = "0.1.0"
__all__ = ["FileChange", "FileDiff", "Mount", "Status", "UserError", "attach", "mount"]
