"""Where a bundle is written: destination checks, the destination lock, the staging folder and the atomic swap."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import platform
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from builder.errors import OutputError
from builder.formatting import describe_bytes
from builder.interrupts import interrupts_recorded, raise_if_interrupted
from builder.manifest import MANIFEST, written_by_modelpack
from builder.trust import SIGNATURE

STAGING_INFIX = ".modelpack-staging-"
LOCK_SUFFIX = ".modelpack-lock"
# How many of the files found in a folder an error message names.
SHOWN_FILES = 5

# renameat2(2) from linux/fcntl.h and linux/fs.h.
AT_FDCWD = -100
RENAME_EXCHANGE = 2
# renameat2's syscall number, for glibc < 2.28, which has no wrapper for it.
RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "ppc64le": 357, "s390x": 347}
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def staging_root(dest: Path, pid: int) -> Path:
    return dest.parent / f".{dest.name}{STAGING_INFIX}{pid}"


def lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{LOCK_SUFFIX}"


def check_output_location(dest: Path, *, sources: dict[str, Path], spec_file: Path) -> None:
    """Refuse, whatever --force says, an output that is or holds a source, the spec, the home or current folder.

    Decided on resolved paths, so a symlink cannot hide an overlap (`-o` and `output.dir` alike).
    """
    if "\0" in str(dest):
        raise OutputError(f"output {str(dest)!r} contains a NUL character, which no filesystem accepts in a name",
                          path=dest)
    resolved = dest.resolve()
    shown = str(dest) if resolved == dest else f"{dest} (resolved: {resolved})"
    for folder, what in ((Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "your home folder")):
        if resolved == folder or resolved in folder.parents:
            relation = "is" if resolved == folder else "holds"
            raise OutputError(
                f"output {shown} {relation} {what} {folder}, which a build must never replace; "
                "point output.dir (or -o) at a folder of its own for the bundle", path=dest,
            )
    for key, source in sources.items():
        real = source.resolve()
        if resolved == real or real in resolved.parents or resolved in real.parents:
            raise OutputError(f"output {shown} overlaps the {key} folder {real}; build somewhere else", path=dest)
    if resolved in spec_file.resolve().parents:
        raise OutputError(f"output {shown} holds the spec file {spec_file}; build somewhere else", path=dest)


def check_destination(dest: Path, *, force: bool) -> None:
    """Refuse, before any work, a destination a build may not replace (checked under the destination lock)."""
    if dest.is_symlink():
        raise OutputError(
            f"output {dest} is a symbolic link (to {os.readlink(dest)}); modelpack replaces only a folder it built: "
            "remove the link or choose another output", path=dest,
        )
    if not dest.exists():
        return
    if not dest.is_dir():
        raise OutputError(f"output {dest} exists and is not a folder; remove it or choose another output", path=dest)
    if not force:
        raise OutputError(
            f"output {dest} already exists; pass --force to replace it (it is kept until the new one is ready)",
            path=dest,
        )
    entries = sorted(os.listdir(dest))
    if not entries:
        return
    manifest = _read_json(dest / MANIFEST)
    if not written_by_modelpack(manifest):
        raise OutputError(
            f"--force replaces only a bundle modelpack built or an empty folder, and output {dest} is neither: "
            f"it has no manifest.json written by modelpack and holds {_some(entries)}; "
            "move them away or choose another output", path=dest,
        )
    # Files the manifest does not list were put there by someone else: --force must not delete them.
    files = manifest.get("files")
    # model.sig: the signature `modelpack sign` adds over the manifest's files, which it cannot list itself.
    listed = {*(files if isinstance(files, dict) else ()), MANIFEST, SIGNATURE}
    unlisted = [name for name in _files_below(dest) if name not in listed]
    if unlisted:
        raise OutputError(
            f"--force would delete files modelpack did not write: the bundle {dest} holds {_some(unlisted)}, "
            "which its manifest.json does not list; move them out of it first", path=dest,
        )


@contextlib.contextmanager
def destination_lock(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock on dest from before any work until after publishing; a second build is refused.

    flock(2), not the mere existence of a file: the kernel releases it when its holder dies, even by SIGKILL or a
    power loss, so a lock is never stale. The lock file records the holder's pid for the refusal message, and is
    removed while still held so no litter stays beside the bundle. That removal is safe because a build that
    locked a file which was unlinked meanwhile sees it is no longer the one at the path and locks again: two
    builds can never hold two different lock files for one destination.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(dest)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"another modelpack build (pid {holder}) is writing {dest}; wait for it or build elsewhere", path=dest,
            ) from None
        if _is_at(fd, path):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # A lock file that cannot be removed (the folder turned read-only) is harmless: flock decides, not the file.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def remove_stale_staging(dest: Path, *, progress: Callable[[str], None]) -> None:
    """Remove the staging folders that killed builds (SIGKILL, power loss) left beside dest.

    Called only while holding dest's lock, and every build holds that lock for as long as its staging folder
    exists, so every staging folder found here is stale. Nothing but the exact staging names is touched.
    """
    stale = re.compile(re.escape(f".{dest.name}{STAGING_INFIX}") + r"\d+")
    for entry in sorted(dest.parent.iterdir()):
        if stale.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            size = sum(p.lstat().st_size for p in entry.rglob("*"))
            shutil.rmtree(entry)
            progress(f"removed stale staging folder {entry.name} ({describe_bytes(size)}) left by an interrupted build")


def check_disk_space(dest: Path, needed: int) -> None:
    """The new bundle is written in full before the one it replaces is removed: it needs all its space."""
    free = shutil.disk_usage(dest.parent).free
    if free < needed:
        raise OutputError(
            f"output {dest}: the bundle needs {describe_bytes(needed)} but {dest.parent} has {describe_bytes(free)} "
            "free; free space or pass -o to build elsewhere", path=dest,
        )


@contextlib.contextmanager
def staged_output(dest: Path, *, force: bool, needed: int, progress: Callable[[str], None]) -> Iterator[Path]:
    """A build's output from start to publish: lock dest, check it, remove stale staging, check the disk space, and
    yield a fresh staging folder; the body writes, verifies and calls publish().

    An OSError of the output anywhere inside (disk full, read-only folder, ...) becomes one OutputError sentence,
    raised after the staging folder is removed and with dest unchanged.
    """
    with output_errors(dest, needed=needed), destination_lock(dest):
        check_destination(dest, force=force)
        remove_stale_staging(dest, progress=progress)
        check_disk_space(dest, needed)
        # Errors of the write are described before the staging folder is removed: a full disk is still full then,
        # so statvfs can tell missing bytes from missing inodes.
        with staging_folder(dest) as bundle, output_errors(dest, needed=needed):
            yield bundle


@contextlib.contextmanager
def staging_folder(dest: Path) -> Iterator[Path]:
    """A fresh folder for the bundle, named exactly like dest, inside a hidden folder beside dest; removed if the
    build fails or is interrupted.

    The name matters: transformers 4.x imports a bundle's remote code as the package
    `transformers_modules.<folder name>`, so a name with a dot (as `.NAME.staging-PID` had) breaks every relative
    import of the model's code; verifying under the final name loads the code exactly as deployment will. Beside
    dest, so the final rename stays on one filesystem and is atomic.
    """
    root = staging_root(dest, os.getpid())
    # mode 0700: only this user can enter it, so what is written and checked there stays what was checked (a
    # pull trusts the hashes it computed while writing); a folder a killed build with our pid left was removed
    root.mkdir(mode=0o700)
    bundle = root / dest.name
    try:
        with interrupts_recorded():
            bundle.mkdir()
            yield bundle
    except BaseException:  # interrupted builds too: never leave half a bundle behind
        shutil.rmtree(root, ignore_errors=True)
        raise


def publish(bundle: Path, dest: Path) -> None:
    """Make the finished bundle dest, durably; a replaced dest never stops existing, then its old files go.

    Not if the user pressed Ctrl-C during the build, even where a library swallowed the KeyboardInterrupt."""
    raise_if_interrupted()
    sync_tree(bundle)
    root = bundle.parent
    if not dest.exists():
        bundle.rename(dest)
    elif not _exchange(bundle, dest):
        # No atomic exchange here: for the moment between these two renames dest does not exist. The previous
        # bundle then waits in the staging folder (removed as stale by the next build if this one is killed).
        previous = root / ("previous" if dest.name != "previous" else "previous-bundle")
        dest.rename(previous)
        bundle.rename(dest)
    _fsync(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    # The new bundle is in place: what cannot be removed now is a stale staging folder the next build removes.
    shutil.rmtree(root, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder below folder, children first.

    A rename can reach the disk before the data of the files it publishes (ext4 and xfs order metadata, not
    data), so without this a power loss right after publishing could leave a bundle of empty files.
    """
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(os.path.join(parent, name), os.O_RDONLY)
        _fsync(parent, os.O_RDONLY | os.O_DIRECTORY)


@contextlib.contextmanager
def output_errors(dest: Path, *, needed: int) -> Iterator[None]:
    """Turn a failed write of the output (disk full, read-only or immutable folder, a refused name, permissions)
    into one OutputError sentence; an OSError about another path (a source being read) passes through."""
    try:
        yield
    except OSError as error:
        paths = [Path(os.fsdecode(p)) for p in (error.filename, error.filename2) if isinstance(p, (str, bytes))]
        ours = [p for p in paths if _is_output_path(p, dest)]
        # Without a path (a failed write() names no file), only these errors are surely about the output.
        if not ours and error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        where = ours[0] if ours else dest.parent
        target = str(where) if ours else f"the bundle for {dest}"
        raise OutputError(_describe_output_error(error, dest, needed, where=where, target=target), path=where,
                          errno=error.errno) from error


def _describe_output_error(error: OSError, dest: Path, needed: int, *, where: Path, target: str) -> str:
    """One sentence for a refused write of the output: what happened to `where` (named in it as `target`), and
    the fix."""
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        usage = os.statvfs(dest.parent)
        if code == errno.EDQUOT:
            what = f"your disk quota on {dest.parent} is exhausted"
        elif usage.f_favail == 0 and usage.f_files:
            what = f"the filesystem of {dest.parent} has no free inodes (file entries) left"
        else:
            what = f"the filesystem of {dest.parent} is full"
        return (
            f"{what} while writing {target}; the bundle needs {describe_bytes(needed)}: free space or pass -o to "
            "build elsewhere"
        )
    if code in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), where)
        return f"cannot create {target}: {blocker} is a file in the way; move it or choose another output"
    if code == errno.EROFS:
        return f"cannot write {target}: {dest.parent} is on a read-only filesystem; pass -o to build elsewhere"
    if code == errno.EACCES:
        return (
            f"permission denied writing {target}; make {where.parent} writable for this user "
            "or pass -o to build elsewhere"
        )
    if code == errno.EPERM:
        return (
            f"operation not permitted writing {target}: {where.parent} may be immutable (`lsattr -d {where.parent}`); "
            "clear the attribute or pass -o to build elsewhere"
        )
    if code == errno.ENAMETOOLONG:
        name_bytes = len(os.fsencode(dest.name))
        # The longest name a build creates is its staging folder's, with the largest pid Linux hands out.
        overhead = len(os.fsencode(staging_root(dest, 4194304).name)) - name_bytes
        limit = _name_max(dest.parent) - overhead
        if name_bytes > limit:
            return (
                f"the output name {dest.name[:40]}... is too long for the filesystem of {dest.parent}: it has "
                f"{name_bytes} bytes and may have {limit} here (the staging folder beside it adds {overhead}); "
                "choose a shorter name"
            )
        return f"the filesystem refuses the path {where} as too long; choose a shorter output path"
    if code in (errno.EINVAL, errno.EILSEQ):
        return (
            f"the filesystem of {dest.parent} refuses the name {where.name!r} ({error.strerror}); "
            "choose another output name"
        )
    return f"cannot write {target}: {error.strerror}; pass -o to build elsewhere"


def _is_output_path(path: Path, dest: Path) -> bool:
    """dest, the folders above it (created if missing), or what a build writes beside it (staging, lock)."""
    if path == dest.parent or path in dest.parent.parents:
        return True
    if dest.parent not in path.parents:
        return False
    first = path.relative_to(dest.parent).parts[0]
    return first == dest.name or first.startswith(f".{dest.name}.modelpack-")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    if _LIBC is None:
        return False
    args = (AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if hasattr(_LIBC, "renameat2"):
        result = _LIBC.renameat2(*args)
    elif platform.machine() in RENAMEAT2_SYSCALL:
        result = _LIBC.syscall(ctypes.c_long(RENAMEAT2_SYSCALL[platform.machine()]), *args)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):  # a filesystem without exchange (some FUSE, NFS) or a kernel < 3.15
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file fd is still the file at path."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _files_below(folder: Path) -> list[str]:
    """Every non-folder entry below folder, relative; Python's __pycache__ (made by importing load.py) aside."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if "__pycache__" not in p.relative_to(folder).parts and (p.is_symlink() or not p.is_dir())
    )


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_FILES])
    more = len(names) - SHOWN_FILES
    return f"{shown} and {more} more" if more > 0 else shown


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except OSError:
        return 255
