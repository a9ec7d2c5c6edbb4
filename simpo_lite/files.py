"""Writing files so that a crash or a full disk never leaves a half-written one, and telling paths from ids.

Torch-free: the config layer uses it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_text(path: Path, text: str) -> Path:
    """Write through a temporary file in the same folder and rename it: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, value: Any) -> Path:
    return write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_folder(target: Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with fill(tmp) and rename it to target, so a failure leaves no partial target
    (and an existing target stays as it was until the new one is complete)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        _apply_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _apply_umask(folder: Path) -> None:
    """mkdtemp and some libraries' temporary files are owner-only; give the result normal modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def looks_like_local_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether a name given for a model or dataset means a local file or folder rather than a Hub id:
    it exists, starts like a path, or ends in one of `suffixes` (data files). Hub ids are never tried
    for these, so a mistyped path is 'not found' at once instead of a network lookup."""
    return (name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
            or (bool(suffixes) and Path(name).suffix.lower() in suffixes))
