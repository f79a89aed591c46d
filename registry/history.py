"""``history.jsonl``: the registry's source of truth, one JSON ``Record`` per line.

Writers hold an exclusive ``fcntl.flock`` on the file itself while they read it, build the
next record and append it (flush + fsync), so seqs and versions are assigned atomically across
processes. A writer that got the lock on a file that was replaced while it waited (an editor's
save, ``cp`` then ``mv``) opens the file now at the path and locks that instead, so no record
goes to a file nobody reads. Readers hold a shared lock.

A torn last line (unterminated and not a whole record, or only NUL bytes and blanks: what a
crash mid-write leaves) is ignored on read, and the next append truncates it away before
writing, so every record stays on its own valid line. An unterminated last line that is the
whole next record lost only its newline: it is kept, and the next append writes the newline
first. A complete last line that is not the next record (edited, damaged or duplicated by
hand) is not torn: read leaves it out (logging ``registry_history_bad_tail``) so serving goes
on, but appends are refused with RegistryUnavailable naming the line until it is fixed or
removed by hand, so its seq and version are never given to another artifact. Any other bad
line is RegistryUnavailable naming the file (not its directory) and the line.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from banter.errors import BanterError, RegistryUnavailable, WireError
from registry.records import Record

log = logging.getLogger("banter.registry")


class HistoryFile:
    """The append-only record file at ``path`` (its parent dirs are created on first append)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._last_seq_key: tuple[int, int, int] | None = None
        self._last_seq = 0
        self._last_damage = ""  # why the file at _last_seq_key is damaged, if it is

    def read(self) -> list[Record]:
        """Every record in order (a torn last line is left out); [] when there is no file."""
        return _parse(self._bytes()[0], self.path)[0]

    def last_seq(self) -> int:
        """The seq of the last record (0 when none); cheap while the file is unchanged, a
        damaged one too (its RegistryUnavailable is raised again without reading it)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._unavailable("read", exc) from None
        if _stat_key(st) != self._last_seq_key:
            data, key = self._bytes()
            try:
                records = _parse(data, self.path)[0]
            except RegistryUnavailable as exc:  # a damaged line: until the file changes
                self._last_seq_key, self._last_damage = key, exc.message
                raise
            self._last_seq = records[-1].seq if records else 0
            self._last_seq_key, self._last_damage = key, ""
        if self._last_damage:  # a new exception each time: one raised again keeps its frames
            raise RegistryUnavailable(self._last_damage)
        return self._last_seq

    def damage(self) -> str:
        """Why the file cannot take an append (a line that is not the next record, its last
        included, or the file cannot be read), or "" when it can."""
        try:
            _parse(self._bytes()[0], self.path, strict_tail=True)
        except RegistryUnavailable as exc:
            return exc.message
        return ""

    def append(self, make: Callable[[list[Record]], Record]) -> Record:
        """Under the exclusive lock: read the records, call ``make(records)`` for the next one
        (its seq must be the last seq + 1), append it as one line, fsync, return it.

        If ``make`` raises, nothing is written (a missing file is not created: ``make([])`` is
        asked first) and the exception propagates; a file that cannot be written is
        RegistryUnavailable.
        """
        try:
            return self._append(make)
        except OSError as exc:
            raise self._unavailable("written", exc) from None

    def _append(self, make: Callable[[list[Record]], Record]) -> Record:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        if created:
            try:
                make([])  # a refusal leaves no empty file behind
            except BanterError:
                if not self.path.exists():
                    raise
                # another process created the file meanwhile (its first record may already
                # be mirrored, which makes an empty file look behind): decide under its lock
                created = False
        with self._locked() as f:
            f.seek(0)
            data = f.read()
            records, good_end = _parse(data, self.path, strict_tail=True)
            record = make(list(records))
            last = records[-1].seq if records else 0
            if record.seq != last + 1:
                raise WireError(f"refusing to append seq {record.seq} to {self.path}: "
                                f"the next seq is {last + 1}")
            line = record.to_json()
            Record.from_json(line)  # never write a line that would not read back
            if good_end < len(data):
                log.warning("registry_history_torn_tail_dropped",
                            extra={"path": str(self.path), "bytes": data[good_end:][:200]})
                f.truncate(good_end)
            elif data and not data.endswith(b"\n"):  # a last record whose newline was lost
                f.write(b"\n")
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            _fsync_dir(self.path.parent)
        return record

    @contextmanager
    def _locked(self) -> Iterator[BinaryIO]:
        """The file at ``path`` open for appending under its exclusive lock. Once the lock is
        held it must still be the file at ``path``: one replaced (or moved away) meanwhile is
        let go and the path opened again."""
        while True:
            with open(self.path, "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                held = os.fstat(f.fileno())
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    continue
                if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                    yield f
                    return

    def _unavailable(self, verb: str, exc: OSError) -> RegistryUnavailable:
        return RegistryUnavailable(f"the registry history {self.path.name} cannot be {verb}: "
                                   f"{exc.strerror or exc}")

    def _bytes(self) -> tuple[bytes, tuple[int, int, int] | None]:
        """The file's bytes and stat key, both taken under a shared lock (b"" when there is no
        file); RegistryUnavailable when it cannot be read."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return b"", None
        except OSError as exc:
            raise self._unavailable("read", exc) from None
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            return f.read(), _stat_key(os.fstat(f.fileno()))


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _parse(data: bytes, path: Path, strict_tail: bool = False) -> tuple[list[Record], int]:
    """Decode the file's bytes into records; also return the byte offset where the kept lines
    end (``len(data)`` unless the last line is torn or bad). An unterminated last line that is
    the whole next record (a crash between its bytes and its newline) is kept; any other is
    torn. ``strict_tail``: a complete last line that is not the next record and not crash
    debris raises RegistryUnavailable (an append must not drop it), as any earlier bad line
    does."""
    records: list[Record] = []
    lines = data.split(b"\n")
    # After the last b"\n" comes an unterminated remainder: b"" when the file ends cleanly.
    terminated, remainder = lines[:-1], lines[-1]
    unterminated = bool(remainder.strip(_DEBRIS))
    candidates = [*terminated, remainder] if unterminated else terminated
    offset = 0
    for number, line in enumerate(candidates, start=1):
        last = number == len(candidates)
        try:
            record = _next_record(line, records[-1].seq + 1 if records else 1)
        except WireError as exc:
            if last and (unterminated or not line.strip(_DEBRIS)):
                return records, offset  # a torn last line: crash debris
            if last and not strict_tail:
                log.error("registry_history_bad_tail", extra={
                    "path": str(path), "line": number, "error": exc.message})
                return records, offset
            raise RegistryUnavailable(
                f"{path.name} line {number} is not the next registry record ({exc.message}); "
                f"{path.name} is append-only: restore it from a backup or remove that line by "
                "hand") from None
        records.append(record)
        offset += len(line) + (0 if last and unterminated else 1)
    return records, offset


_DEBRIS = b"\0 \t\r"  # what a crash mid-write leaves besides part of a line


def _next_record(line: bytes, seq: int) -> Record:
    """The record on ``line``, which must have seq ``seq``; WireError saying why not."""
    record = Record.from_json(line)
    if record.seq != seq:
        raise WireError(f"it has seq {record.seq}, expected {seq}")
    return record


def _fsync_dir(path: Path) -> None:
    """Make a newly created file's directory entry durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
