"""Reading and writing files so that a fault is one clear line and never a half-written file.

Every writer of the project goes through `write_text`, `write_json`, `append_line` or `write_folder`:
each writes through a temporary file or folder and renames it (readers see the old or the new
version), and turns a full disk into `errors.DiskFull` (what was being written, how much it needs,
the space left). `guard` gives the same to writers that cannot go through these (a library's cache).
Readers of user files check them here too: `read_text`/`check_utf8` (text that is not UTF-8),
`check_safetensors`/`check_torch_file` (truncated weights), `missing_path` (a mistyped path).
Writers of user-given paths call `check_output_path` first, so a path that cannot be written is one
line before any work.

Torch-free: the config layer uses it too.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

from simpo_lite.errors import DiskFull, UserError, first_line

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Libraries that do not pass the OS error on (torch.save says 'unexpected pos' or 'iostream error'):
# their I/O or runtime error counts as a full disk when less than this is left.
LOW_SPACE = 1 << 20


# ---- a full disk --------------------------------------------------------------------------------

def _disk_usage(path: Path):
    """shutil.disk_usage of the file system that holds `path` (or its nearest existing folder); None
    when it cannot be read."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path)
    except OSError:
        return None


def free_bytes(path: Path) -> int | None:
    """Free space on the file system that holds `path` (or its nearest existing folder)."""
    usage = _disk_usage(path)
    return None if usage is None else usage.free


def folder_size(path: Path) -> int:
    """Bytes in a file or a folder's files; a file renamed or removed while counting (a download or a
    write still going on) counts as gone."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for item in path.rglob("*") if path.is_dir() else ():
        try:
            total += item.stat().st_size if item.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def is_disk_full(err: BaseException, where: Path) -> bool:
    """Whether `err` (or an error it was raised from) is a full disk or an exhausted quota."""
    first, seen, named = err, 0, False
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        text = str(err)
        if "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        named = named or (isinstance(err, OSError) and err.errno is not None)
        err, seen = err.__cause__ or err.__context__, seen + 1
    if named or not isinstance(first, (OSError, RuntimeError)):
        # The OS gave another cause (no such folder, no permission), or it is the project's own error or a
        # library's value error: never the disk, however little space there is.
        return False
    # Pseudo file systems (/proc, /sys) read 0 bytes of 0: that is no size at all, not a full disk.
    usage = _disk_usage(where)
    return usage is not None and usage.total > 0 and usage.free < LOW_SPACE


@contextlib.contextmanager
def guard(what: str, where: Path, needed: int | Callable[[], int] | None = None,
          estimate: int | None = None, hint: str | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into DiskFull. `needed`: bytes the write had reached (or a
    function giving them at the moment of failure); `estimate`: what the whole write needs, if known."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        if not is_disk_full(err, where):
            raise
        written = (needed() if callable(needed) else needed) or 0
        size = max(written, estimate or 0)
        raise DiskFull(what, where, size or None, more_than=not estimate or written > estimate,
                       free=free_bytes(where), hint=hint) from err


# ---- writers ------------------------------------------------------------------------------------

def write_file(path: Path, fill: Callable[[Path], None], what: str | None = None,
               estimate: int | None = None) -> Path:
    """fill(tmp) writes the file (any library's writer), which is then renamed to `path`: readers see
    the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with guard(what or path.name, path, needed=lambda: folder_size(tmp), estimate=estimate):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fill(tmp)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def write_text(path: Path, text: str, what: str | None = None) -> Path:
    data = text.encode("utf-8")
    return write_file(path, lambda tmp: tmp.write_bytes(data), what, estimate=len(data))


def write_json(path: Path, value: Any, what: str | None = None) -> Path:
    return write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n", what)


def append_line(path: Path, line: str, what: str | None = None) -> None:
    """Append one line; a write that fails is cut back off, so the file keeps only whole lines."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    with guard(what or path.name, path, estimate=len(data)):
        with path.open("ab") as handle:
            start = handle.tell()
            try:
                handle.write(data)
                handle.flush()
            except BaseException:
                with contextlib.suppress(OSError):
                    handle.truncate(start)
                raise


def write_folder(target: Path, fill: Callable[[Path], None], what: str | None = None,
                 estimate: int | None = None, hint: str | None = None) -> Path:
    """Build a folder with fill(tmp) and rename it to target, so a failure leaves no partial target
    (and an existing target stays as it was until the new one is complete). `estimate`: the bytes
    it will take, and `hint`: the way forward, for the message when the disk fills up."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    with guard(what or target.name, target, estimate=estimate, hint=hint):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-{_HOST}-", dir=target.parent))
    try:
        with guard(what or target.name, target, needed=lambda: folder_size(tmp), estimate=estimate, hint=hint):
            fill(tmp)
            _apply_umask(tmp)
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
    except BaseException:
        if old.exists() and not target.exists():  # interrupted between the two renames: the previous one back
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# This machine, in the names of unfinished folders: a process id means nothing on another host that
# shares the folder.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def remove_orphans(target: Path) -> None:
    """Delete the unfinished folders for `target` that killed processes of this machine left (SIGKILL, out
    of memory: nothing ran to remove them); each name holds its writer's process id and host."""
    for folder in target.parent.glob(f".{glob.escape(target.name)}.tmp-*-{_HOST}-*"):
        pid = folder.name[len(target.name) + 6:].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _apply_umask(folder: Path) -> None:
    """mkdtemp and some libraries' temporary files are owner-only; give the result normal modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# ---- readers ------------------------------------------------------------------------------------

def first_non_utf8(path: Path) -> tuple[int, int, int] | None:
    """(byte offset, line, byte) of the first byte of `path` that is not UTF-8 text; None if all is."""
    offset, line, carry = 0, 1, b""
    with Path(path).open("rb") as handle:
        while True:
            chunk = handle.read(1 << 22)
            data = carry + chunk
            if not data:
                return None
            try:
                data.decode("utf-8")
                good, carry = len(data), b""
            except UnicodeDecodeError as err:
                if chunk and err.reason == "unexpected end of data" and err.end == len(data):
                    good, carry = err.start, data[err.start:]  # a character split by the chunk boundary
                else:
                    return offset + err.start, line + data[:err.start].count(b"\n"), data[err.start]
            line += data[:good].count(b"\n")
            offset += good


def check_utf8(path: Path, expects: str, name: str | None = None) -> None:
    """UserError naming the line and byte offset where `path` stops being UTF-8 text."""
    bad = first_non_utf8(path)
    if bad is None:
        return
    offset, line, byte = bad
    with Path(path).open("rb") as handle:
        head = handle.read(2)
    utf16 = head in (b"\xff\xfe", b"\xfe\xff")
    looks = " (it looks like UTF-16)" if utf16 else ""
    raise UserError(f"'{name or path}' is not UTF-8 text{looks}: byte 0x{byte:02x} at line {line} (byte offset "
                    f"{offset}); {expects}, in UTF-8: convert it, e.g. iconv -f {'utf-16' if utf16 else 'latin1'} "
                    f"-t utf-8 {path} > "
                    f"{Path(path).stem}.utf8{Path(path).suffix}")


def read_text(path: Path, expects: str, name: str | None = None) -> str:
    """A user's text file; one line naming where it is not UTF-8 instead of a UnicodeDecodeError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        check_utf8(path, expects, name)
        raise


def check_safetensors(path: Path) -> str | None:
    """What is wrong with a safetensors file (missing, truncated, a broken header); None when whole.
    Reads only the header: its offsets say how long the file must be."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                return f"{path.name} is truncated ({size} bytes, less than its {8 + length}-byte header)"
            header = json.loads(handle.read(length))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is damaged ({size} bytes, its header is unreadable)"
    if 8 + length + end > size:
        return f"{path.name} is truncated ({size} of {8 + length + end} bytes)"
    return None


def check_torch_file(path: Path) -> str | None:
    """What is wrong with a torch.save file (a zip archive): missing, truncated or not an archive."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            if any(i.header_offset + i.compress_size > size for i in archive.infolist()):
                raise zipfile.BadZipFile
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"{path.name} is damaged or truncated ({path.stat().st_size} bytes)"
    return None


# ---- paths --------------------------------------------------------------------------------------

def looks_like_local_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether a name given for a model or dataset means a local file or folder rather than a Hub id:
    it exists, starts like a path, has more parts than a Hub id's 'owner/name', its first part is a
    local folder (`runs/...`), or it ends in one of `suffixes` (data files). Hub ids are never tried
    for these, so a mistyped path is 'not found' at once instead of a network lookup."""
    path = Path(name).expanduser()
    parts = name.replace("\\", "/").strip("/").split("/")
    return (name.startswith((".", "/", "~")) or "\\" in name or path.exists() or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir())
            or (bool(suffixes) and path.suffix.lower() in suffixes))


def nearest_path(name: str) -> str | None:
    """The existing path nearest to `name`, which does not exist (its first missing part swapped for
    the closest name beside it), or None when nothing there is close."""
    path = Path(name).expanduser()
    missing, parent = path, path.parent
    while not parent.exists() and parent != parent.parent:
        missing, parent = parent, parent.parent
    if not parent.is_dir():
        return None
    try:
        names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    except OSError:
        return None
    close = difflib.get_close_matches(missing.name, names, n=1, cutoff=0.6)
    return str(parent / close[0] / path.relative_to(missing)) if close else None


def missing_path(name: str, what: str, how: str = "check the path") -> str:
    """"<what> 'X' not found", suggesting the existing name nearest to its first missing part."""
    near = nearest_path(name)
    return f"{what} '{name}' not found; did you mean '{near}'?" if near else f"{what} '{name}' not found; {how}"


def local_hint(name: str, what: str) -> str:
    """For a name that went to the Hub and failed there: '; no local <what> 'X' (did you mean 'Y'?)'
    when a local name is close to it (a typo of a local folder or file is then the likelier story), else ''.
    Called on the failure only: the Hub path of a good name never pays for the listing."""
    if Path(name).expanduser().exists():
        return ""
    near = nearest_path(name)
    return f"; no local {what} '{name}' (did you mean '{near}'?)" if near else ""


def check_output_path(path: Path, flag: str = "--out", folder: bool = False) -> Path:
    """One line before any work when `path` (a file, or with `folder` a folder) cannot be written: it is
    a folder where a file goes or the reverse, a part of the way to it is a file, or the nearest
    existing folder above it takes no new files (no permission, read-only, /proc). Leaves nothing behind."""
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} '{path}' is a file: give a folder path")
    if not folder and path.is_dir():
        raise UserError(f"{flag} '{path}' is a folder: give a file path")
    above = path.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{flag} '{path}': '{above}' is a file, not a folder, so nothing can be written under it: "
                        f"choose another {flag}")
    # Writers create a temporary file or folder next to the target: probe for exactly that right.
    try:
        handle, probe = tempfile.mkstemp(prefix=".simpo-lite-probe-", dir=above)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{flag} '{path}': cannot create files in '{above}' ({err.strerror or first_line(err)}): "
                        f"choose another {flag}") from None
    return path
