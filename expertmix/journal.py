"""Progress journals: an append-only JSONL beside a single-file output (``OUT.partial``), so that a long job that
writes one file at its end (prune's scores, prefs' pairs) keeps every finished unit when it is interrupted and a
rerun of the same command skips them.

The first line records the job's settings; a rerun with other settings is refused by name rather than mixing two
runs. Each later line is one finished unit under a key, flushed and synced as it is written; a line cut short by a
kill is dropped on reading. The journal is held with the kernel's lock while a process uses it, and removed once
the output is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ExpertmixError
from .fsutil import flock_nowait


def journal_path(out: str | os.PathLike) -> Path:
    """Where the journal of output file ``out`` lives: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def weights_identity(folder: str | os.PathLike) -> dict:
    """A cheap identity of a model folder's weights (its resolved path and each weight file's size and mtime):
    enough to tell that a rerun scores with the same model, without reading gigabytes to hash them."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")) if folder.is_dir() else []
    return {"path": str(folder),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


class Journal:
    """Finished units of one job, read back from ``OUT.partial`` and appended to as the job goes on."""

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any], what: str):
        self.path = journal_path(out)
        self.settings = json.loads(json.dumps(settings, default=str))
        self.what = what  # what a unit is, for messages ("scored documents")
        self.done: dict[str, Any] = {}
        self._file = None

    def open(self) -> dict[str, Any]:
        """Hold the journal, read what an earlier run finished (refusing one with other settings) and go on
        appending; returns the finished units by key."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if flock_nowait(self._file.fileno()) is False:
            self.close()
            raise ExpertmixError(f"{self.path} is in use by another expertmix process; wait for it to end or stop "
                                 f"it, then rerun")
        try:
            if self._file.tell() == 0:
                self._write({"settings": self.settings})
            else:
                self.done = self._read()
        except BaseException:
            self.close()
            raise
        return self.done

    def _read(self) -> dict[str, Any]:
        data = self.path.read_bytes()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):  # a last line cut short by a kill mid-write: dropped, its unit is done again
            os.ftruncate(self._file.fileno(), whole)
        lines = data[:whole].decode("utf-8", errors="replace").splitlines()
        if not lines:  # killed while writing its first line
            self._write({"settings": self.settings})
            return {}
        try:
            header = json.loads(lines[0])["settings"]
        except (ValueError, KeyError, TypeError):
            raise ExpertmixError(f"{self.path}: not a progress journal of expertmix (its first line holds no "
                                 f"settings); remove it or choose another --out") from None
        if header != self.settings:
            changed = sorted(k for k in set(header) | set(self.settings) if header.get(k) != self.settings.get(k))
            raise ExpertmixError(f"{self.path} holds an interrupted run with other settings ({', '.join(changed)}); "
                                 f"rerun with those settings to finish it, or remove it to start over")
        done: dict[str, Any] = {}
        for n, line in enumerate(lines[1:], start=2):
            try:
                row = json.loads(line)
                done[row["key"]] = row["value"]
            except (ValueError, KeyError, TypeError):
                raise ExpertmixError(f"{self.path} line {n} is not a journal entry; remove the file to start "
                                     f"over") from None
        return done

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def add(self, key: str, value: Any) -> None:
        """Record one finished unit."""
        self.done[key] = value
        self._write({"key": key, "value": value})

    def add_many(self, items: dict[str, Any]) -> None:
        """Record several finished units with one sync (a batch's worth)."""
        self.done.update(items)
        if items:
            self._file.write("".join(json.dumps({"key": k, "value": v}, ensure_ascii=False, default=str) + "\n"
                                     for k, v in items.items()))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Let go of the journal, keeping it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def stopped(self, exc: BaseException) -> None:
        """The job stopped before its output was written: keep the journal if it holds finished units (and say so
        on an interruption), else remove it, so a failed command leaves nothing behind."""
        self.close()
        if not self.done:
            self.path.unlink(missing_ok=True)
        elif isinstance(exc, KeyboardInterrupt):
            exc.add_note(f"{len(self.done)} {self.what} kept in {self.path}: rerun the same command to go on "
                         f"from there")

    def finish(self) -> None:
        """The output is written: the journal is no longer needed."""
        self.close()
        self.path.unlink(missing_ok=True)
