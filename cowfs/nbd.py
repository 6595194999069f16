"""A minimal NBD client (fixed newstyle handshake, simple replies): enough to
write ranges into an image that ``qemu-nbd`` serves, so that QEMU itself lays
them out in the qcow2 file (see `cowfs.transfer.export_qcow2`)."""

from __future__ import annotations

import socket
import struct

_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = b"IHAVEOPT"
_OPT_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_FLAG_FIXED_NEWSTYLE = 1
_FLAG_NO_ZEROES = 2
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_REP_ERROR_BIT = 1 << 31
_CMD_WRITE, _CMD_DISC, _CMD_FLUSH, _CMD_WRITE_ZEROES = 1, 2, 3, 6
_TRANSMISSION_SEND_WRITE_ZEROES = 1 << 6
MAX_REQUEST = 4 << 20  # qemu-nbd accepts up to 32 MiB per request


class NbdError(OSError):
    pass


class NbdClient:
    """One connection to an NBD export over a unix socket."""

    def __init__(self, socket_path: str, export_name: bytes = b"") -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.connect(socket_path)
        self._handle = 0
        self.size = 0
        self.transmission_flags = 0
        self._handshake(export_name)

    def _recv(self, length: int) -> bytes:
        chunks = []
        while length:
            chunk = self._sock.recv(length)
            if not chunk:
                raise NbdError("NBD server closed the connection")
            chunks.append(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def _handshake(self, export_name: bytes) -> None:
        if self._recv(8) != _NBDMAGIC or self._recv(8) != _IHAVEOPT:
            raise NbdError("not a newstyle NBD server")
        (server_flags,) = struct.unpack(">H", self._recv(2))
        if not server_flags & _FLAG_FIXED_NEWSTYLE:
            raise NbdError("NBD server lacks fixed newstyle negotiation")
        self._sock.sendall(struct.pack(">I", _FLAG_FIXED_NEWSTYLE | (server_flags & _FLAG_NO_ZEROES)))
        payload = struct.pack(">I", len(export_name)) + export_name + struct.pack(">H", 0)
        self._sock.sendall(_IHAVEOPT + struct.pack(">II", _OPT_GO, len(payload)) + payload)
        while True:
            magic, _, reply, length = struct.unpack(">QIII", self._recv(20))
            data = self._recv(length)
            if magic != _OPT_REPLY_MAGIC:
                raise NbdError("bad NBD option reply")
            if reply & _REP_ERROR_BIT:
                raise NbdError(f"NBD server refused the export: {data.decode(errors='replace')}")
            if reply == _REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == 0:
                self.size, self.transmission_flags = struct.unpack(">QH", data[2:12])
            elif reply == _REP_ACK:
                return

    def _command(self, command: int, offset: int, length: int, data: bytes = b"") -> None:
        self._handle += 1
        self._sock.sendall(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, command, self._handle, offset, length) + data)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != _SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdError("bad NBD reply")
        if error:
            raise NbdError(error, f"NBD request failed at offset {offset}")

    def write(self, offset: int, data: bytes) -> None:
        self._command(_CMD_WRITE, offset, len(data), data)

    def write_zeroes(self, offset: int, length: int) -> None:
        while length:
            piece = min(length, 1 << 30)
            if self.transmission_flags & _TRANSMISSION_SEND_WRITE_ZEROES:
                self._command(_CMD_WRITE_ZEROES, offset, piece)
            else:
                piece = min(piece, MAX_REQUEST)
                self.write(offset, bytes(piece))
            offset += piece
            length -= piece

    def flush(self) -> None:
        self._command(_CMD_FLUSH, 0, 0)

    def close(self) -> None:
        """Disconnect cleanly (the server then closes the image and exits)."""
        try:
            self._handle += 1
            self._sock.sendall(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_DISC, self._handle, 0, 0))
        except OSError:
            pass
        self._sock.close()
