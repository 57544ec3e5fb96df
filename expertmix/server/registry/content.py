"""Content checks on uploaded files: pickles are refused, safetensors headers must be well formed."""

from __future__ import annotations

import json
import pickletools
import re
import struct
from collections.abc import Callable
from pathlib import PurePosixPath

from .errors import HubError
from .storage import BlobStorage, read_range

Reader = Callable[[int, int], bytes]  # (start, length) -> bytes

MAX_SAFETENSORS_HEADER = 100 << 20


HEAD_BYTES = 512  # how much of a file the content checks read
_IMPORTS = {"GLOBAL", "STACK_GLOBAL", "INST"}  # opcodes that import (and so can run) code when unpickled
_MEMO = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "MARK"}


_IMPORTED = re.compile(r"^[A-Za-z_][\w.]* [A-Za-z_][\w.]*$")  # GLOBAL/INST's "module name"


def _is_headerless_pickle(head: bytes) -> bool:
    """Protocol 0 and 1 pickles carry no header: bytes that parse as pickle opcodes, to their STOP (or over most of
    a cut head), memoize, and import code by a ``module name`` pair. Text rarely gets far: most letters are no
    opcode, or take arguments it lacks, and its lines are no ``module name``."""
    seen: set[str] = set()
    end = 0
    try:
        for op, arg, pos in pickletools.genops(head):
            if op.name in ("GLOBAL", "INST") and not _IMPORTED.match(str(arg)):
                return False
            seen.add(op.name)
            end = pos
            if op.name == "STOP":
                break
        else:
            return False
    except ValueError as exc:  # not a pickle, or a head cut mid-opcode
        if len(head) < HEAD_BYTES or end < HEAD_BYTES // 2 or "unknown" in str(exc):
            return False
    return bool(seen & _IMPORTS) and bool(seen & _MEMO)


def refuse_pickle(path: str, head: bytes) -> None:
    """Refuse bytes that are a pickle (any protocol) or a torch zip archive (which holds one), whatever the file is
    named."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 or _is_headerless_pickle(head[:HEAD_BYTES]):
        raise HubError(400, f"{path}: content is a Python pickle; weights must be safetensors")
    if head.startswith(b"PK\x03\x04") and b".pkl" in head[:512]:
        raise HubError(400, f"{path}: content is a torch.save archive (a pickle); use safetensors")


def check_safetensors(path: str, read: Reader, size: int) -> None:
    """Check a .safetensors blob's header: length, JSON, dtypes, shapes and offsets that fit the file.

    Hand-written rather than ``safetensors.safe_open`` because blobs may live on remote storage; reading the
    header (8 bytes + JSON) is enough and never loads tensor data.
    """
    if size < 8:
        raise HubError(400, f"{path}: not a safetensors file ({size} bytes, shorter than its header length)")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise HubError(400, f"{path}: not a safetensors file (header length {n} does not fit "
                            f"a {size}-byte file)")
    try:
        header = json.loads(read(8, n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(400, f"{path}: safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise HubError(400, f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise HubError(400, f"{path}: safetensors __metadata__ must map strings to strings")
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) for o in info["data_offsets"])
              and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data_len)
        if not ok:
            raise HubError(400, f"{path}: safetensors entry {name!r} is malformed or points outside the file")


def check_content(path: str, read: Reader, size: int) -> None:
    """All content checks for one committed file, reading through ``read``."""
    refuse_pickle(path, read(0, HEAD_BYTES))
    if PurePosixPath(path).suffix.lower() == ".safetensors":
        check_safetensors(path, read, size)


def check_bytes(path: str, data: bytes) -> None:
    """Content checks for a file held in memory."""
    check_content(path, lambda start, length: data[start:start + length], len(data))


def check_blob(path: str, storage: BlobStorage, sha: str, size: int) -> None:
    """Content checks for a stored blob."""
    check_content(path, lambda start, length: read_range(storage, sha, start, length), size)
