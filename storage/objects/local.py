"""Object store on the local file system (``file:///abs/path``), the default for development.

Layout: the object ``a/b/c.ogg`` is the file ``<root>/a/b/c.ogg``. Consequences worth knowing:

* A key cannot also be a "directory" of other keys on disk: with ``a/b`` stored, ``put("a")`` fails
  with :class:`ObjectStoreError` (and vice versa); S3 allows both. Parley's key layout never needs it.
* Writes are atomic: data goes to ``<dir>/.tmp-<random>``, is fsynced, then ``os.replace``d over the
  key (and the directory is fsynced). A reader sees the old object or the new one, never a mix, and
  an object being written does not exist until it is complete. ``list`` ignores ``.tmp-`` files;
  ones left behind by a crash can be removed by an operator at any time.
* ``content_type`` is kept in the extended attribute ``user.parley.content_type`` where the file
  system supports it (ext4, xfs, btrfs, tmpfs on Linux >= 6.6); without it, it is guessed from the
  key's extension (``None`` if unknown).
* ``etag`` is a weak ``<mtime_ns hex>-<size hex>`` tag, not an MD5.
* Emptied directories are removed by ``delete`` and ``delete_prefix``.
* Every file system call runs in a small thread pool owned by the store, never on the event loop.
  Containment: keys are validated (no ``..``, no leading ``/``), every path is checked to be under
  the root, lexically and after resolving symbolic links (a link someone planted that leads out of
  the root makes the operation fail); ``list``/``delete_prefix`` never follow symbolic links.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import itertools
import mimetypes
import os
import secrets
import stat as stat_module
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator, Iterator
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from .base import (
    CHUNK_SIZE,
    TEMP_PREFIX,
    InvalidRange,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    ObjectStoreUnavailable,
    ThreadRunner,
    as_chunk,
    range_requested,
    validate_content_type,
    validate_delete_prefix,
    validate_key,
    validate_list_prefix,
    validate_range,
)

__all__ = ["LocalObjectStore", "parse_file_url"]

XATTR_CONTENT_TYPE = "user.parley.content_type"
_NAME_MAX = 255
_LIST_PAGE = 1000
_OPEN_ATTEMPTS = 5

# Only Python's built-in table (not /etc/mime.types), so the guess is the same on every machine,
# plus the audio types Parley stores that the built-in table lacks.
_MIME = mimetypes.MimeTypes()
for _ext, _type in {
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
    ".wav": "audio/wav",
    ".weba": "audio/webm",
}.items():
    _MIME.add_type(_type, _ext)


def guess_content_type(key: str) -> str | None:
    """The content type the local store reports when the file system keeps no xattr."""
    return _MIME.guess_type(key, strict=False)[0]


def parse_file_url(url: str) -> str:
    """The absolute root directory of a ``file:///abs/path`` URL (percent-decoded, normalised)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("invalid file object store URL (could not parse it)") from None
    if parts.scheme.lower() != "file":
        raise ValueError("a local object store URL must start with file://")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"file object store URL must be file:///ABSOLUTE/PATH (three slashes); got host {parts.netloc!r}"
        )
    if parts.query or parts.fragment:
        raise ValueError("file object store URL takes no query string or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError("file object store URL needs an absolute path: file:///ABSOLUTE/PATH")
    if "\x00" in path:
        raise ValueError("file object store path must not contain NUL")
    return os.path.normpath(path)


def _is_missing(exc: OSError) -> bool:
    return isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError)


class _AtomicWriter:
    """A temp file next to the target, renamed over it on commit. Methods run in worker threads."""

    def __init__(self, path: str, check_inside: Callable[[str], None]) -> None:
        self._path = path
        self._check_inside = check_inside
        self._dir = os.path.dirname(path)
        self._tmp: str | None = None
        self._fd = -1
        self._lock = threading.Lock()  # a cancelled write may still run while discard() is called

    def open(self) -> None:
        for _ in range(_OPEN_ATTEMPTS):
            self._check_inside(self._dir)  # before makedirs: never create directories outside
            os.makedirs(self._dir, exist_ok=True)
            tmp = os.path.join(self._dir, TEMP_PREFIX + secrets.token_hex(8))
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                continue  # a concurrent delete removed the emptied directory; make it again
            with self._lock:
                self._tmp, self._fd = tmp, fd
            return
        raise ObjectStoreError(f"could not create a temporary file in {self._dir}")

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                raise ObjectStoreError("write after the temporary file was closed")
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]

    def commit(self, content_type: str) -> os.stat_result:
        with self._lock:
            if self._fd < 0 or self._tmp is None:
                raise ObjectStoreError("commit after the temporary file was closed")
            fd, tmp = self._fd, self._tmp
            if hasattr(os, "setxattr"):
                # Unsupported here: stat() falls back to guessing from the extension.
                with contextlib.suppress(OSError):
                    os.setxattr(fd, XATTR_CONTENT_TYPE, content_type.encode("ascii"))
            os.fsync(fd)
            result = os.fstat(fd)
            self._fd = -1
            os.close(fd)
            try:
                os.replace(tmp, self._path)
            except OSError:
                self._unlink_tmp()
                raise
            self._tmp = None
        _fsync_dir(self._dir)
        return result

    def discard(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._unlink_tmp()

    def _unlink_tmp(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _take(iterator: Iterator[ObjectInfo], count: int) -> builtins.list[ObjectInfo]:
    return builtins.list(itertools.islice(iterator, count))


class LocalObjectStore:
    """The :class:`~storage.objects.ObjectStore` on a local directory."""

    kind = "file"

    def __init__(self, root: str | os.PathLike[str], *, max_workers: int = 4) -> None:
        root_str = os.fspath(root)
        if not os.path.isabs(root_str):
            raise ValueError("the local object store root must be an absolute path")
        self._root = os.path.normpath(root_str)
        self._runner = ThreadRunner(max_workers, "parley-objects-file")

    @classmethod
    def from_url(cls, url: str) -> LocalObjectStore:
        return cls(parse_file_url(url))

    @property
    def root(self) -> str:
        return self._root

    def __repr__(self) -> str:
        return f"LocalObjectStore(root={self._root!r})"

    # ---------------------------------------------------------------------------------- paths

    def _path(self, key: str) -> str:
        validate_key(key)
        segments = key.split("/")
        for segment in segments:
            if len(segment.encode("utf-8")) > _NAME_MAX:
                raise ValueError(f"object key segments are limited to {_NAME_MAX} bytes on local disk")
        return self._contained(os.path.join(self._root, *segments))

    def _contained(self, path: str) -> str:
        path = os.path.normpath(path)
        if os.path.commonpath([self._root, path]) != self._root:
            raise ValueError("object key resolves outside the store's root")
        return path

    def _check_inside(self, path: str) -> None:
        """Refuse a path that symbolic links (planted by someone else) resolve outside the root."""
        real, real_root = os.path.realpath(path), os.path.realpath(self._root)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise ObjectStoreError("refusing a path that a symbolic link leads out of the object store root")

    def _key_conflict(self, key: str, exc: OSError) -> ObjectStoreError:
        return ObjectStoreError(
            f"cannot store {key!r} on local disk: it conflicts with an existing object or prefix "
            f"(a key cannot also be a prefix of other keys here; {exc.strerror or type(exc).__name__})"
        )

    # ------------------------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        try:
            await self._runner.run(os.makedirs, self._root, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreUnavailable(
                f"cannot create the object store directory {self._root}: {exc.strerror}"
            ) from exc

    async def check(self) -> None:
        if self._runner.closed:
            raise ObjectStoreUnavailable("the object store is closed")
        problem = await self._runner.run(self._check_sync)
        if problem:
            raise ObjectStoreUnavailable(problem)

    def _check_sync(self) -> str | None:
        if not os.path.isdir(self._root):
            return f"object store directory {self._root} does not exist"
        if not os.access(self._root, os.W_OK | os.X_OK):
            return f"object store directory {self._root} is not writable"
        return None

    async def aclose(self) -> None:
        self._runner.shutdown()

    # ----------------------------------------------------------------------------------- write

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterable[bytes],
        *,
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        path = self._path(key)
        validate_content_type(content_type)
        writer = _AtomicWriter(path, self._check_inside)
        try:
            await self._runner.run(writer.open)
        except (FileExistsError, NotADirectoryError) as exc:
            raise self._key_conflict(key, exc) from exc
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                await self._runner.run(writer.write, bytes(data) if not isinstance(data, bytes) else data)
            else:
                async for chunk in data:
                    piece = as_chunk(chunk)
                    if piece:
                        await self._runner.run(writer.write, piece)
            st = await self._runner.run(writer.commit, content_type)
        except BaseException as exc:
            await self._discard(writer)
            if isinstance(exc, IsADirectoryError | NotADirectoryError) or (
                isinstance(exc, OSError) and exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
            ):
                raise self._key_conflict(key, exc) from exc
            raise
        return self._info(key, st, content_type)

    async def _discard(self, writer: _AtomicWriter) -> None:
        try:
            await self._runner.run(writer.discard)
        except ObjectStoreError:  # closed meanwhile: removing one temp file inline is acceptable
            writer.discard()

    # ------------------------------------------------------------------------------------ read

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        validate_range(start, end)
        return self._get(key, path, start, end)

    async def _get(self, key: str, path: str, start: int, end: int | None) -> AsyncIterator[bytes]:
        fd, remaining = await self._runner.run(self._open_range, key, path, start, end)
        try:
            offset = start
            while remaining > 0:
                chunk = await self._runner.run(os.pread, fd, min(CHUNK_SIZE, remaining), offset)
                if not chunk:
                    break
                offset += len(chunk)
                remaining -= len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def _open_range(self, key: str, path: str, start: int, end: int | None) -> tuple[int, int]:
        self._check_inside(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if _is_missing(exc):
                raise ObjectNotFound(f"object {key!r} not found") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                raise ObjectNotFound(f"object {key!r} not found")
            size = st.st_size
            if range_requested(start, end) and start >= size:
                raise InvalidRange(f"range start {start} is past the end of {key!r} ({size} bytes)")
            last = size - 1 if end is None else min(end, size - 1)
            return fd, max(0, last - start + 1)
        except BaseException:
            os.close(fd)
            raise

    async def read(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.get(key)])

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return await self._runner.run(self._stat_sync, key, path)

    def _stat_sync(self, key: str, path: str) -> ObjectInfo | None:
        self._check_inside(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            if _is_missing(exc):
                return None
            raise
        if not stat_module.S_ISREG(st.st_mode):
            return None
        return self._info(key, st, self._content_type(key, path))

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    @staticmethod
    def _content_type(key: str, path: str) -> str | None:
        if hasattr(os, "getxattr"):
            try:
                return os.getxattr(path, XATTR_CONTENT_TYPE).decode("ascii", "replace")
            except OSError:
                pass
        return guess_content_type(key)

    @staticmethod
    def _info(key: str, st: os.stat_result, content_type: str | None) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
            last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
            content_type=content_type,
        )

    # ----------------------------------------------------------------------------------- list

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        validate_list_prefix(prefix)
        return self._list(prefix)

    async def _list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        *complete, partial = prefix.split("/")
        start_dir = self._contained(os.path.join(self._root, *complete))
        key_base = "".join(segment + "/" for segment in complete)
        walker = self._walk(start_dir, key_base, partial)
        try:
            while True:
                page = await self._runner.run(_take, walker, _LIST_PAGE)
                for info in page:
                    yield info
                if len(page) < _LIST_PAGE:
                    return
        finally:
            walker.close()

    def _walk(self, directory: str, key_base: str, name_prefix: str) -> Generator[ObjectInfo, None, None]:
        """Depth-first walk yielding objects in key order: a directory sorts as ``name + "/"``."""
        try:
            with os.scandir(directory) as scan:
                entries = builtins.list(scan)
        except OSError as exc:
            if _is_missing(exc):
                return
            raise
        ordered: builtins.list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            name = entry.name
            if name.startswith(TEMP_PREFIX) or not name.startswith(name_prefix):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                continue  # not a name this store wrote
            if entry.is_dir(follow_symlinks=False):
                ordered.append((name + "/", entry, True))
            elif entry.is_file(follow_symlinks=False):
                ordered.append((name, entry, False))
        ordered.sort(key=lambda item: item[0])
        for sort_name, entry, is_dir in ordered:
            if is_dir:
                yield from self._walk(entry.path, key_base + sort_name, "")
                continue
            key = key_base + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while we were walking
            yield self._info(key, st, self._content_type(key, entry.path))

    # --------------------------------------------------------------------------------- delete

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await self._runner.run(self._delete_sync, path)

    def _delete_sync(self, path: str) -> None:
        self._check_inside(os.path.dirname(path))
        try:
            os.unlink(path)
        except OSError as exc:
            if _is_missing(exc) or exc.errno == errno.EISDIR:
                return
            raise
        self._prune(os.path.dirname(path))

    def _prune(self, directory: str) -> None:
        """Remove ``directory`` and its parents up to (not including) the root while they are empty."""
        while directory != self._root and os.path.commonpath([self._root, directory]) == self._root:
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    async def delete_prefix(self, prefix: str) -> int:
        validate_delete_prefix(prefix)
        base = self._contained(os.path.join(self._root, *prefix[:-1].split("/")))
        return await self._runner.run(self._delete_tree, base)

    def _delete_tree(self, base: str) -> int:
        if not os.path.isdir(base) or os.path.islink(base):
            return 0
        self._check_inside(base)
        deleted = 0
        for dirpath, dirnames, filenames in os.walk(base, topdown=False, followlinks=False):
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue  # an in-flight put owns it
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    continue
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                deleted += 1
            for name in dirnames:
                # Fails when not empty (an in-flight temp file, a symlink) or already gone.
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(dirpath, name))
        try:
            os.rmdir(base)
        except OSError:
            return deleted
        self._prune(os.path.dirname(base))
        return deleted
