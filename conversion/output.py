"""Guarded, atomic output folders for conversions.

A conversion writes into `OUT.tmp-<random>` next to `OUT` and renames it at the end. Nothing at `OUT` is ever removed
unless the caller allowed it, and that is checked again at the final rename, under a lock that keeps a second
conversion from writing the same `OUT`. `--overwrite` replaces only a previous engram-hf output, never the base
model's folder, the current directory or one of their parents. A killed run's temporary folder is recognised (the pid
written inside it is gone) and reported, or removed with `clean`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

RUN_MARKER = ".engram-hf-run"  # inside a temporary folder: the pid of the conversion writing it


def is_engram_output(folder: Path) -> bool:
    """Whether `folder` holds an Engram checkpoint (a config with `engram_*` fields), as engram-hf writes them."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "engram_layer_ids" in config


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(output_dir: Path) -> list[Path]:
    """Temporary folders of conversions into `output_dir` whose process is gone (killed runs' leftovers)."""
    stale = []
    for folder in sorted(output_dir.parent.glob(f"{output_dir.name}.tmp-*")):
        marker = folder / RUN_MARKER
        try:
            pid = int(marker.read_text())
        except (OSError, ValueError):
            pid = None
        if folder.is_dir() and (pid is None or not _alive(pid)):
            stale.append(folder)
    return stale


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class GuardedOutput:
    """`with GuardedOutput(out, overwrite, protected=[base_folder]) as tmp:` write into `tmp`, then `commit()`.

    Leaving the block without `commit()` (an error, Ctrl-C, SIGTERM turned into `SystemExit`) removes `tmp` and
    leaves `OUT` as it was.
    """

    def __init__(self, output_dir: Path, overwrite: bool = False, clean: bool = False):
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.overwrite = overwrite
        self.protected: list[Path] = []
        self.tmp: Path | None = None
        self._lock = None
        self.check()
        self._leftovers(clean)

    def protect(self, folder: Path) -> None:
        """Refuse an output that is, or contains, `folder` (the base model's)."""
        self.protected.append(Path(folder).expanduser().resolve())
        self.check()

    def check(self) -> None:
        """Raise if writing `output_dir` could lose anything."""
        out = self.output_dir
        for place in (*self.protected, Path.cwd().resolve()):
            if _within(place, out):
                raise ValueError(f"Output folder {out} is (or contains) {place}; choose a new folder.")
        if out.exists() or out.is_symlink():
            if not self.overwrite:
                raise FileExistsError(f"Output folder {out} already exists (pass overwrite=True / --overwrite).")
            if not out.is_dir() or out.is_symlink():
                raise FileExistsError(f"{out} exists and is not a folder; --overwrite replaces only engram-hf outputs.")
            if not is_engram_output(out):
                raise FileExistsError(
                    f"{out} is not an engram-hf output (no Engram config.json); --overwrite replaces only those."
                )

    def _leftovers(self, clean: bool) -> None:
        """Report (or with `clean` remove) the temporary folders of killed conversions into `output_dir`."""
        out = self.output_dir
        stale = stale_temporaries(out)
        if stale and clean:
            for folder in stale:
                shutil.rmtree(folder, ignore_errors=True)
            logger.warning("removed %d leftover folder(s) of killed conversions: %s", len(stale),
                           ", ".join(str(f) for f in stale))
        elif stale:
            listing = ", ".join(f"{f} ({_folder_bytes(f) / 2**30:.2f} GiB)" for f in stale)
            logger.warning("leftover folder(s) of killed conversions into %s: %s; pass clean=True (--clean) to "
                           "remove them", out, listing)

    def __enter__(self) -> Path:
        out = self.output_dir
        out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(out.parent / f".{out.name}.engram-hf.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release()
            raise FileExistsError(f"Another conversion is writing {out} right now.") from None
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # a folder like any other (mkdtemp makes it private)
            (self.tmp / RUN_MARKER).write_text(str(os.getpid()))
        except BaseException:
            self.__exit__()
            raise
        return self.tmp

    def commit(self) -> Path:
        """Move the finished folder to `output_dir`, checking again that nothing there is lost."""
        out, tmp = self.output_dir, self.tmp
        (tmp / RUN_MARKER).unlink()
        if out.exists() or out.is_symlink():  # appeared (or changed) while the conversion ran: checked again
            if not self.overwrite or not out.is_dir() or out.is_symlink() or not is_engram_output(out):
                raise FileExistsError(f"{out} was created while the conversion ran; nothing was overwritten.")
            old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        self.tmp = None
        return out

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None
