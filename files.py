"""Durable writes for files that mark work complete (manifests, shards, checkpoints' meta.json, final weights),
reading such a JSON file back as one clear error when its bytes are damaged, and a full disk reported as one.

A file is written under a unique temporary name in its own folder, fsynced, renamed over the target and the
folder fsynced, so that a crash or kill -9 at any moment leaves either the old complete file or the new one,
never a torn one, and two writers never share a temporary name.

Also: the lock that makes one process the only writer of a folder (a run, its prepared data, its tokenizer), and
the content digest that checkpoints and exports record for every file they write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from ondol.errors import OndolError

LOCK = ".lock"  # in a folder with one writer at a time: the holder's pid and host


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames and new entries in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it for every thread)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; on a clean exit it is fsynced and renamed to `path`,
    on an exception removed. The file gets the permissions of a plain `open(path, "w")` (0666 less the umask:
    0644 under the usual 022), not the private 0600 the temporary file is created with."""
    path = Path(path)
    # named before it is created, so that a signal handled just after the creation still finds it to remove
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` durably and atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder` and every folder in it (files written by a library that does not).
    A file gone between listing and opening is skipped: another rank's temp file, renamed by write_atomic,
    which fsyncs it itself."""
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                fsync_file(Path(root) / name)
            except FileNotFoundError:
                continue
        fsync_dir(root)


def read_json(path: str | os.PathLike, error: type[OndolError], remedy: str) -> dict:
    """The JSON object in `path`; damaged bytes (not UTF-8, not JSON, not an object) raise `error` naming the
    file, followed by `remedy` (what to do)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: damaged, not JSON ({e}); {remedy}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: damaged, a JSON {type(obj).__name__} where an object belongs; {remedy}")
    return obj


@contextlib.contextmanager
def space_checked(folder: str | os.PathLike, error: type[OndolError], what: str, need_bytes: int) -> Iterator[None]:
    """A full disk (ENOSPC) while writing `what` into `folder` becomes `error` naming the folder, the space it
    needs and the space free; files written with atomic_path are then whole or absent, never half-written."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(folder).free
        raise error(f"{folder}: no space left on the device for {what} (about {need_bytes / 2**20:,.1f} MiB "
                    f"needed, {free / 2**20:,.1f} MiB free); free some space and run the same command again"
                    ) from None


def move_aside(path: str | os.PathLike, label: str = "replaced") -> Path:
    """Rename `path` to `NAME.LABEL-YYYYmmdd-HHMMSS` beside it (a `-2`, `-3`, ... suffix if that is taken) so that a
    fresh one can take its place while the old one is kept, not deleted; the new path."""
    path = Path(path)
    stem = path.with_name(f"{path.name}.{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    aside, n = stem, 1
    while aside.exists():
        n += 1
        aside = stem.with_name(f"{stem.name}-{n}")
    path.rename(aside)
    return aside


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """The hex digest of a file's bytes, read in chunks: `sha256` (what sha256sum and model hubs use) or
    `xxh3_128` (xxHash: about 10x faster, and as sure to catch damaged bytes, but not a defence against someone
    who can rewrite the file: they could rewrite the digest beside it too)."""
    with open(path, "rb") as f:
        if algorithm != "xxh3_128":
            return hashlib.file_digest(f, algorithm).hexdigest()
        digest, chunk = xxhash.xxh3_128(), bytearray(1 << 23)
        view = memoryview(chunk)
        while n := f.readinto(chunk):
            digest.update(view[:n])
        return digest.hexdigest()


def file_digests(paths: list[Path], algorithm: str) -> list[str]:
    """file_digest of each path, several files at once on the cores this process may use (hashlib and xxhash
    release the GIL while they hash)."""
    workers = max(1, min(len(paths), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: file_digest(p, algorithm), paths))


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, error: Callable[[str], Exception]) -> Iterator[None]:
    """Be the only writer of what the lock file `path` guards for the with-block (a run: RUN_DIR/.lock): an
    exclusive POSIX record lock (fcntl) on it, the file created with this process's pid and host in it and
    removed on release. If another process holds it, `error(one line naming its pid and host)` is raised.
    A record lock belongs to the process alone: the OS drops it when the holder exits or is killed (kill -9
    leaves none behind), and the workers it forks do not inherit it, so a worker that outlives a killed command
    blocks no rerun; on NFS the server arbitrates it between hosts. A lock taken on a file that its holder had
    just removed is taken again on the new file, so two processes never hold two files of one name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "a process that is starting"
            os.close(fd)
            raise error(f"{path} is held by {holder}, which is writing there: wait for it to finish or stop it, "
                        "or use another folder") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the file now at `path`
    try:
        me = f"pid {os.getpid()} on host {socket.gethostname()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still locked: a waiter that opened it finds it gone and opens anew
        os.close(fd)
