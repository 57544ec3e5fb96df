"""Content checks on weight files, shared by the local store, the publish client and the registry server.

A Python pickle runs code when it is loaded, whatever the file is called, so every shared file is read forward,
once, without holding it in memory: pickle opcodes are walked with their stack effects (so text that merely
starts like protocol-0 opcodes is no pickle), gzip/bz2/xz content is decompressed (up to a cap), zip and tar
archives (torch.save's ``archive/data.pkl``, ``.npz``) are opened member by member, and a NumPy ``.npy`` of
Python objects (stored as a pickle) is named. Safetensors headers must be well formed.
"""

from __future__ import annotations

import ast
import bz2
import gzip
import io
import json
import lzma
import math
import os
import pickletools
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import StoreError

MAX_DECOMPRESSED = 1 << 30  # decompressed bytes one check reads before it refuses a possible decompression bomb
MAX_NESTING = 6  # compression and archives inside each other
MAX_MEMBERS = 10_000  # members of one archive
MAX_OPCODES = 10_000_000  # pickle opcodes walked in one stream
MAX_SAFETENSORS_HEADER = 100 << 20
HEAD_BYTES = 512  # how much of a file a check on its head alone (an upload's first bytes) sees
SUGGESTION = "weights must be safetensors"

_CHUNK = 1 << 16
_REPLAY = 1 << 20  # bytes of a stream that cannot seek kept, so that a second reading can start over
_LINE_KEPT = 4096  # of a protocol-0 text argument, the part kept to check it
_MEMO_TRACKED = 1 << 20  # memo entries remembered to check GET opcodes against
_DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, zipfile.BadZipFile, tarfile.TarError,
                         ValueError)


class ContentError(StoreError):
    """A file whose content is refused: a pickle (under any name or wrapping), a possible decompression bomb, or
    a malformed safetensors file."""


class _Ended(Exception):
    """The data ended inside an opcode or a header."""


class _TooMuch(Exception):
    """More decompressed bytes than the check reads."""


class _Budget:
    """Decompressed bytes read so far, shared by every layer of one check."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise _TooMuch


class _Source:
    """Forward reads over a binary stream in chunks; it can start over while what it read is still buffered, or
    when the stream can seek."""

    def __init__(self, raw: BinaryIO, seekable: bool):
        self.raw = raw
        self.seekable = seekable
        self.origin = raw.tell() if seekable else 0
        self.end = raw.seek(0, os.SEEK_END) - self.origin if seekable else None
        if seekable:
            raw.seek(self.origin)
        self.buf = bytearray()
        self.pos = 0  # index into buf
        self.base = 0  # offset of buf[0] from the start of the data
        self.eof = False

    def readable(self) -> bool:  # the file-object face that decompressors and tarfile read through
        return True

    def _fill(self, want: int) -> None:
        while len(self.buf) - self.pos < want and not self.eof:
            if self.pos >= _CHUNK and (self.seekable or self.base or len(self.buf) > _REPLAY):
                del self.buf[:self.pos]
                self.base += self.pos
                self.pos = 0
            data = self.raw.read(max(_CHUNK, want - (len(self.buf) - self.pos)))
            if data:
                self.buf += data
            else:
                self.eof = True

    def peek(self, n: int) -> bytes:
        self._fill(n)
        return bytes(self.buf[self.pos:self.pos + n])

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        self._fill(n)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += len(out)
        return out

    def exact(self, n: int) -> bytes:
        out = self.read(n)
        if len(out) < n:
            raise _Ended
        return out

    def skip(self, n: int) -> None:
        """Move ``n`` bytes on (seeking where the stream can); _Ended when the data ends first."""
        avail = len(self.buf) - self.pos
        if n <= avail:
            self.pos += n
            return
        n -= avail
        self.base += len(self.buf)
        self.buf.clear()
        self.pos = 0
        if self.seekable and self.end is not None:
            if self.base + n > self.end:
                self.base, self.eof = self.end, True
                self.raw.seek(self.origin + self.end)
                raise _Ended
            self.base += n
            self.raw.seek(self.origin + self.base)
            return
        while n:
            data = self.raw.read(min(n, 1 << 20))
            if not data:
                self.eof = True
                raise _Ended
            n -= len(data)
            self.base += len(data)

    def line(self) -> tuple[bytes, int, int] | None:
        """The next line without its newline: its first bytes, its length and its last byte; None when the data
        ends first."""
        kept, length, last = bytearray(), 0, -1
        while True:
            i = self.buf.find(b"\n", self.pos)
            stop = i if i >= 0 else len(self.buf)
            if stop > self.pos:
                if len(kept) < _LINE_KEPT:
                    kept += self.buf[self.pos:min(stop, self.pos + _LINE_KEPT - len(kept))]
                length += stop - self.pos
                last = self.buf[stop - 1]
            if i >= 0:
                self.pos = i + 1
                return bytes(kept), length, last
            self.pos = len(self.buf)
            if self.eof:
                return None
            self._fill(1)

    def restart(self) -> bool:
        """Read again from the start; False when that is no longer possible."""
        if self.seekable:
            self.raw.seek(self.origin)
            self.buf.clear()
            self.pos = self.base = 0
            self.eof = False
            return True
        if self.base == 0:
            self.pos = 0
            return True
        return False


class _Decompressed:
    """A decompressing file object read forward: its bytes count against the budget, and corrupt or cut data
    reads as the end (what came before it is what a loader would have seen)."""

    def __init__(self, f: BinaryIO, budget: _Budget, counted: bool = True):
        self.f = f
        self.budget = budget
        self.counted = counted
        self.done = False

    def read(self, n: int = -1) -> bytes:
        if self.done:
            return b""
        try:
            data = self.f.read(n if n is not None and n >= 0 else _CHUNK)
        except _DECOMPRESSION_ERRORS:
            data = b""
        if not data:
            self.done = True
        elif self.counted:
            self.budget.take(len(data))
        return data


class _Member:
    """One member of a zip archive read from its local header on: stored bytes or a raw deflate stream, up to its
    compressed size (or its end, when the header does not give the size)."""

    def __init__(self, src: _Source, size: int | None, deflated: bool, budget: _Budget):
        self.src = src
        self.left = size
        self.inflate = zlib.decompressobj(-15) if deflated else None
        self.budget = budget
        self.done = False

    def _raw(self, n: int) -> bytes:
        k = n if self.left is None else min(n, self.left)
        data = self.src.read(k) if k > 0 else b""
        if self.left is not None:
            self.left -= len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        n = _CHUNK if n is None or n < 0 else n
        if self.inflate is None:
            return self._raw(n)
        out = b""
        try:
            while not out and not self.done:
                if self.inflate.unconsumed_tail:
                    out = self.inflate.decompress(self.inflate.unconsumed_tail, n)
                else:
                    comp = self._raw(_CHUNK)
                    if not comp:
                        self.done = True
                        break
                    out = self.inflate.decompress(comp, n)
                if self.inflate.eof and not self.inflate.unconsumed_tail:
                    self.done = True
        except zlib.error:
            self.done = True
        self.budget.take(len(out))
        return out

    def finish(self) -> None:
        """Skip what is left of the member's compressed bytes."""
        if self.left:
            self.src.skip(self.left)
            self.left = 0


# -- pickle opcodes -------------------------------------------------------------------------------------------------

_IMPORTS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}  # bring in code by name
_CALLS = {"REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "PERSID", "BINPERSID"}  # call what came in
_COUNTED = {"string1": (1, False), "bytes1": (1, False), "unicodestring1": (1, False), "long1": (1, False),
            "string4": (4, True), "long4": (4, True), "bytes4": (4, False), "unicodestring4": (4, False),
            "bytes8": (8, False), "unicodestring8": (8, False), "bytearray8": (8, False)}


@dataclass(frozen=True)
class _Op:
    name: str
    arg: str | None  # the argument's kind
    size: int  # fixed argument size
    to_mark: bool  # pops everything down to the topmost MARK
    pops: int  # items popped (below the mark, when to_mark)
    need: int  # items there must be above the mark (OBJ's class)
    pushes: int
    marks: bool  # pushes a MARK


def _op_table() -> list[_Op | None]:
    table: list[_Op | None] = [None] * 256
    for info in pickletools.opcodes:
        before = [s.name for s in info.stack_before]
        after = [s.name for s in info.stack_after]
        to_mark = "mark" in before
        # e.g. APPENDS [list, mark, slice] pops the slice and the mark, then the list; OBJ [mark, class, slice]
        # needs its class above the mark
        pops = before.index("mark") if to_mark else len(before)
        need = len(before) - pops - 2 if to_mark else 0
        arg = info.arg
        table[ord(info.code)] = _Op(info.name, arg.name if arg else None, arg.n if arg and arg.n > 0 else 0,
                                    to_mark, pops, need, 0 if "mark" in after else len(after), "mark" in after)
    return table


_OPS = _op_table()


def _is_dotted_name(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text and all(part.isidentifier() for part in text.split(".")) else None


def _line_arg(src: _Source, kind: str) -> object:
    """A protocol-0 argument (one line, or two for GLOBAL/INST), checked as the unpickler would read it; raises
    ValueError for one it would refuse, _Ended at the end of the data."""
    got = src.line()
    if got is None:
        raise _Ended
    kept, length, last = got
    whole = length == len(kept)
    if kind == "stringnl_noescape_pair":
        second = src.line()
        if second is None:
            raise _Ended
        module, name = _is_dotted_name(kept), _is_dotted_name(second[0])
        if not (whole and second[1] == len(second[0]) and module and name):
            raise ValueError("not a module and a name")
        return f"{module}.{name}"
    if kind == "stringnl":
        if length < 2 or kept[0] not in b"'\"" or last != kept[0]:
            raise ValueError("not a quoted string")
        return None
    if kind == "unicodestringnl":
        return kept.decode("raw-unicode-escape", "replace") if whole else None
    if kind == "stringnl_noescape":  # PERSID: an ASCII persistent id
        kept.decode("ascii")
        return None
    if not whole:
        raise ValueError("a number longer than any pickle holds")
    text = kept.decode("ascii")
    if kind == "floatnl":
        return float(text)
    if kind == "decimalnl_long":
        return int(text[:-1] if text.endswith("L") else text)
    return int(text)  # decimalnl_short: INT, GET, PUT


def _arg(src: _Source, op: _Op) -> object:
    """Read (or skip) one opcode's argument; a short string is returned so that imports can be named."""
    kind = op.arg
    if kind is None:
        return None
    if kind in _COUNTED:
        width, signed = _COUNTED[kind]
        n = int.from_bytes(src.exact(width), "little", signed=signed)
        if n < 0:
            raise ValueError("negative length")
        if n <= 256 and kind.startswith("unicodestring"):
            return src.exact(n).decode("utf-8", "surrogatepass")
        src.skip(n)
        return None
    if op.size:
        raw = src.exact(op.size)
        return struct.unpack("<d", raw)[0] if kind == "float8" else \
            int.from_bytes(raw, "little", signed=kind == "int4")
    return _line_arg(src, kind)


@dataclass
class _Walk:
    """What one pickle did: the code it imported, whether it called any, whether it reached STOP."""

    imports: list[str]
    called: bool = False
    stopped: bool = False
    ops: int = 0


def _walk(src: _Source, budget_ops: int) -> _Walk:
    """Walk one pickle's opcodes from here, with their effect on the unpickler's stack and memo, until STOP, the
    end of the data, or bytes no unpickler would accept; stops early once code was imported and called."""
    walk = _Walk([])
    depths = [0]  # items above each MARK (depths[0]: below any)
    memo: set[int] | None = set()
    strings: dict[int, str] = {}
    recent: list[object] = [None, None]  # the last two values pushed, to name STACK_GLOBAL's import
    while walk.ops < budget_ops:
        code = src.read(1)
        if not code:
            break
        op = _OPS[code[0]]
        if op is None:
            break
        try:
            arg = _arg(src, op)
        except (_Ended, ValueError, UnicodeDecodeError, OverflowError):
            break
        walk.ops += 1
        name = op.name
        if name == "PROTO" and not 0 <= int(arg) <= 5:
            break
        if name in ("EXT1", "EXT2", "EXT4") and int(arg) <= 0:
            break
        if name == "POP":
            if depths[-1]:
                depths[-1] -= 1
            elif len(depths) > 1:
                depths.pop()
            else:
                break
            continue
        if op.to_mark and (len(depths) == 1 or depths.pop() < op.need):
            break
        pops = op.pops
        if depths[-1] < pops:
            break
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not depths[-1] or (isinstance(arg, int) and arg < 0):
                break
            key = len(memo) if memo is not None and name == "MEMOIZE" else arg
            if memo is not None and isinstance(key, int):
                memo.add(key)
                if isinstance(recent[-1], str) and len(strings) < 4096:
                    strings[key] = recent[-1]
                if len(memo) > _MEMO_TRACKED:
                    memo = None  # too many to track: GETs are no longer checked
            continue
        if name in ("GET", "BINGET", "LONG_BINGET") and memo is not None and arg not in memo:
            break
        if name in _IMPORTS:
            if name in ("GLOBAL", "INST"):
                what = str(arg)
            elif name == "STACK_GLOBAL" and all(isinstance(r, str) for r in recent):
                what = f"{recent[0]}.{recent[1]}"
            elif name == "OBJ":
                what = "a class on the stack"
            elif name.startswith("EXT"):
                what = f"extension code {arg}"
            else:
                what = "a name on the stack"
            walk.imports.append(what)
        if name in _CALLS:
            walk.called = True
        if name in ("GET", "BINGET", "LONG_BINGET"):
            recent = [recent[-1], strings.get(arg)]
        elif op.pushes:
            recent = [recent[-1], arg if isinstance(arg, str) else None]
        depths[-1] -= pops
        if op.marks:
            depths.append(0)
        else:
            depths[-1] += op.pushes
        if name == "STOP":
            walk.stopped = True
            break
        if walk.imports and walk.called:
            break
    return walk


def _names(imports: list[str]) -> str:
    unique = list(dict.fromkeys(imports))
    return ", ".join(unique[:3]) + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")


def _scan_pickles(src: _Source, where: str) -> str | None:
    """Walk the pickles at the start of the data, one after another (torch's legacy format writes several)."""
    ops = MAX_OPCODES
    while src.peek(1):
        walk = _walk(src, ops)
        ops -= walk.ops
        if walk.imports and (walk.called or walk.stopped):
            what = "imports and calls code" if walk.called else "imports code"
            return f"{where} is a Python pickle that {what} ({_names(walk.imports)}); {SUGGESTION}"
        if ops <= 0:
            return f"{where} parses as a Python pickle of over {MAX_OPCODES:,} opcodes, too large to check; " \
                   f"{SUGGESTION}"
        if not walk.stopped:
            return None
    return None


# -- containers -----------------------------------------------------------------------------------------------------

def _label(chain: tuple[str, ...]) -> str:
    return "content" + (f" ({', '.join(chain)})" if chain else "")


def _sniff(head: bytes) -> str | None:
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    return None


_OPENERS: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    "gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    "bz2": lambda f: bz2.BZ2File(f),
    "xz": lambda f: lzma.LZMAFile(f),
}


def _has_object(descr: object) -> bool:
    """Whether a NumPy dtype description holds Python objects (type code 'O'), in any field."""
    if isinstance(descr, str):
        return descr.lstrip("<>|=").startswith("O")
    if isinstance(descr, list):
        return any(isinstance(f, tuple) and len(f) >= 2 and _has_object(f[1]) for f in descr)
    return False


def _scan_npy(src: _Source, chain: tuple[str, ...]) -> str | None:
    """A NumPy .npy whose dtype holds Python objects stores them as a pickle (np.load unpickles them)."""
    try:
        major = src.exact(8)[6]
        size = int.from_bytes(src.exact(2 if major == 1 else 4), "little")
        if size > 1 << 16:
            return None
        header = ast.literal_eval(src.exact(size).decode("utf-8" if major >= 3 else "latin-1"))
    except (_Ended, ValueError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError):
        return None
    if isinstance(header, dict) and _has_object(header.get("descr")):
        return f"{_label(chain)} is a NumPy array of Python objects (dtype {header['descr']!r}), stored as a " \
               f"pickle; {SUGGESTION}"
    return None


def _zip_label(name: str) -> str:
    kind = "torch.save archive member" if name == "data.pkl" or name.endswith("/data.pkl") else "zip member"
    return f"{kind} {name}"


def _scan_zip(src: _Source, chain: tuple[str, ...], budget: _Budget) -> str | None:
    """Each member of a zip archive, through its central directory where the stream can seek (as torch.load and
    np.load read it), else from its local headers on."""
    if src.seekable and src.restart():
        try:
            archive = zipfile.ZipFile(src.raw)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
            archive = None
        if archive is not None:
            with archive:
                infos = [i for i in archive.infolist() if not i.is_dir()]
                if len(infos) > MAX_MEMBERS:
                    return f"{_label(chain)} is a zip archive of over {MAX_MEMBERS} members, too many to check"
                for info in infos:
                    try:
                        member = archive.open(info)
                    except (RuntimeError, NotImplementedError, zipfile.BadZipFile, OSError, ValueError):
                        continue  # encrypted or unreadable: no loader gets at it either
                    with member:
                        found = _scan(_Source(_Decompressed(member, budget, info.compress_type != zipfile.ZIP_STORED),
                                              False), chain + (_zip_label(info.filename),), budget)
                    if found:
                        return found
                return None
    return _scan_zip_stream(src, chain, budget) if src.restart() else None


def _scan_zip_stream(src: _Source, chain: tuple[str, ...], budget: _Budget) -> str | None:
    """Zip members read from their local headers on (an archive that cannot seek, or only its head)."""
    try:
        for _ in range(MAX_MEMBERS):
            header = src.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                return None
            flags, method, csize, _usize, nlen, xlen = struct.unpack("<6xHH8xIIHH", header)
            name_raw = src.exact(nlen)
            extra = src.exact(xlen)
            name = name_raw.decode("utf-8" if flags & 0x800 else "cp437", "replace")
            if csize == 0xFFFFFFFF:  # zip64: the sizes are in the extra field
                at = 0
                while at + 4 <= len(extra):
                    tag, length = struct.unpack_from("<HH", extra, at)
                    if tag == 1 and length >= 16:
                        csize = struct.unpack_from("<Q", extra, at + 12)[0]
                    at += 4 + length
            sized = not flags & 0x8
            if flags & 0x1 or method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                if not sized:
                    return None
                src.skip(csize)
                continue
            member = _Member(src, csize if sized else None, method == zipfile.ZIP_DEFLATED, budget)
            found = _scan(_Source(member, False), chain + (_zip_label(name),), budget)
            if found or not sized:
                return found
            member.finish()
    except _Ended:
        return None
    return f"{_label(chain)} is a zip archive of over {MAX_MEMBERS} members, too many to check"


def _scan_tar(src: _Source, chain: tuple[str, ...], budget: _Budget) -> str | None:
    """Each file of a tar archive (torch's oldest format is one), read forward."""
    try:
        with tarfile.open(fileobj=src, mode="r|") as archive:
            for n, info in enumerate(archive):
                if n >= MAX_MEMBERS:
                    return f"{_label(chain)} is a tar archive of over {MAX_MEMBERS} members, too many to check"
                member = archive.extractfile(info) if info.isfile() else None
                if member is not None:
                    found = _scan(_Source(_Decompressed(member, budget, counted=False), False),
                                  chain + (f"tar member {info.name}",), budget)
                    if found:
                        return found
    except (tarfile.TarError, EOFError, OSError, ValueError, _Ended):
        return None
    return None


def _scan(src: _Source, chain: tuple[str, ...], budget: _Budget) -> str | None:
    """What is refused in one stream (or in what it compresses or archives), or None."""
    if len(chain) > MAX_NESTING:
        return f"{_label(chain)} nests compression and archives over {MAX_NESTING} deep; refused as a possible bomb"
    kind = _sniff(src.peek(HEAD_BYTES))
    found = None
    if kind in _OPENERS:
        inner = _Decompressed(_OPENERS[kind](src), budget)
        layer = chain + (f"{kind}-compressed",)
        try:
            found = _scan(_Source(inner, False), layer, budget)
        except _TooMuch:
            return f"{_label(layer)} decompresses to over {budget.limit:,} bytes; refused as a possible " \
                   f"decompression bomb"
    elif kind == "npy":
        found = _scan_npy(src, chain)
    elif kind == "tar":
        found = _scan_tar(src, chain, budget)
    if found:
        return found
    if kind == "zip" or (src.seekable and src.restart() and zipfile.is_zipfile(src.raw)):
        try:
            found = _scan_zip(src, chain, budget)
        except _TooMuch:
            return f"{_label(chain)} decompresses to over {budget.limit:,} bytes; refused as a possible " \
                   f"decompression bomb"
        if found:
            return found
    if kind in ("gzip", "xz", "npy") or not src.restart():  # their first byte is no pickle opcode
        return None
    return _scan_pickles(src, _label(chain))


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable()) and isinstance(stream.tell(), int)
    except (AttributeError, OSError, ValueError):
        return False


# -- public checks --------------------------------------------------------------------------------------------------

def pickle_problem(stream: BinaryIO, max_decompressed: int = MAX_DECOMPRESSED) -> str | None:
    """What makes a stream unsafe to share (a pickle that imports code, plain or compressed or archived, an .npy
    of objects, a possible decompression bomb), read forward to its end if need be; None when it is safe."""
    budget = _Budget(max_decompressed)
    try:
        return _scan(_Source(stream, _seekable(stream)), (), budget)
    except _TooMuch:
        return f"content decompresses to over {budget.limit:,} bytes; refused as a possible decompression bomb"


def head_problem(head: bytes) -> str | None:
    """The same checks on the first bytes of a file only (an upload's sample): a pickle cut short is refused once
    it has imported and called code."""
    return pickle_problem(io.BytesIO(head))


def check_bytes(name: str, data: bytes) -> None:
    """Refuse content held in memory that is (or hides) a pickle; ``name`` is the file it came as."""
    problem = pickle_problem(io.BytesIO(data))
    if problem:
        raise ContentError(f"{name}: {problem}")


def check_file(path: str | os.PathLike, name: str | None = None) -> None:
    """Refuse a file that is (or hides) a pickle, whatever it is named; read forward once, never held whole."""
    label = name or str(path)
    try:
        with open(path, "rb") as f:
            problem = pickle_problem(f)
    except OSError as exc:
        raise ContentError(f"{label}: cannot read it to check its content ({exc.strerror or exc})") from exc
    if problem:
        raise ContentError(f"{label}: {problem}")


_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def safetensors_problem(read: Callable[[int, int], bytes], size: int) -> str | None:
    """What is wrong with a safetensors file's header (read through ``read(start, length)``), or None.

    Hand-written rather than ``safetensors.safe_open`` because the registry's blobs may live on remote storage;
    the 8-byte length and the JSON header are enough, tensor data is never loaded.
    """
    if size < 8:
        return f"not a safetensors file ({size} bytes, shorter than its header length)"
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > min(size - 8, MAX_SAFETENSORS_HEADER):
        return f"not a safetensors file (header length {n} does not fit a {size}-byte file)"
    try:
        header = json.loads(read(8, n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"safetensors header is not JSON ({exc})"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                return "safetensors __metadata__ must map strings to strings"
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
              and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data_len)
        if not ok:
            return f"safetensors entry {name!r} is malformed or points outside the file"
        bits = _DTYPE_BITS.get(info["dtype"])
        span = info["data_offsets"][1] - info["data_offsets"][0]
        if bits is not None and math.prod(info["shape"]) * bits != span * 8:
            return f"safetensors entry {name!r} holds {span} bytes, not the {math.prod(info['shape']) * bits // 8} " \
                   f"its dtype {info['dtype']} and shape {info['shape']} need"
    return None


def check_safetensors(path: str | os.PathLike, name: str | None = None) -> None:
    """Refuse a .safetensors file whose header is not well formed (8-byte length, JSON, offsets in the file)."""
    label = name or str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size

            def read(start: int, length: int) -> bytes:
                f.seek(start)
                return f.read(length)

            problem = safetensors_problem(read, size)
    except OSError as exc:
        raise ContentError(f"{label}: cannot read it to check its header ({exc.strerror or exc})") from exc
    if problem:
        raise ContentError(f"{label}: {problem}")


def check_folder_file(path: Path, name: str | None = None) -> None:
    """All content checks for one file about to be shared: no pickle inside, and a well-formed header for
    ``*.safetensors``."""
    check_file(path, name)
    if path.suffix.lower() == ".safetensors":
        check_safetensors(path, name)


__all__ = ["HEAD_BYTES", "MAX_DECOMPRESSED", "ContentError", "check_bytes", "check_file", "check_folder_file",
           "check_safetensors", "head_problem", "pickle_problem", "safetensors_problem"]
