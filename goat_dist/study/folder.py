"""A study's output folder: one sweep at a time, and only one set of settings per folder.

Rows of one table must be comparable, so every study records the settings its units share in
``<study_dir>/study.json`` and refuses to continue a folder recorded with other settings. A lock
file keeps two sweeps from running in one folder (they would rerun or wipe each other's units).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from typing import IO, Any, Optional

from .readback import read_json


class StudyFolderError(ValueError):
    """The folder is busy or holds a study with other settings; the message says what to do."""


def sha256_of(path: Optional[str]) -> Optional[str]:
    """Hex SHA-256 of a file's bytes (None for no file)."""
    if not path:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def open_study_folder(study_dir: str, settings: dict[str, Any]) -> IO:
    """Create/lock ``study_dir`` and record ``settings``; returns the lock (keep it open).

    Raises:
        StudyFolderError: another process holds the folder, or it was recorded with other
            settings (the message names the keys that differ).
    """
    from ..train.monitor import write_json_atomic

    os.makedirs(study_dir, exist_ok=True)
    lock = open(os.path.join(study_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise StudyFolderError(f"another study is running in {study_dir}") from None
    study_json = os.path.join(study_dir, "study.json")
    previous = read_json(study_json)
    if previous is not None and previous.get("settings") != settings:
        lock.close()
        diff = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
        raise StudyFolderError(
            f"{study_dir} holds a study with other settings ({', '.join(diff)} differ); its "
            f"finished units would not be comparable. Use a new --study-dir, or rerun with the "
            f"settings recorded in {study_json}")
    if previous is None:
        # written once: a rerun with the same settings leaves a committed study.json untouched
        write_json_atomic(study_json, {"settings": settings,
                                       "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return lock
