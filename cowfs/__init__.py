"""cowfs: mount a directory of disk images as disposable, writable copies."""

from .api import FileChange, FileDiff, Mount, Status, attach, mount
from .errors import UserError

__version__ = "0.1.0"
__all__ = ["FileChange", "FileDiff", "Mount", "Status", "UserError", "attach", "mount"]
