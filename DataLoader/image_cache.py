"""``cache_images``: the decoded, resized uint8 pixels of a split in one file, filled as the loader reads
them, so that later epochs skip JPEG decoding and resizing.

The file (``<folder>/<host>-<digest>_<R>px.cache``, named by the machine, the split's image paths and R) holds
a flag byte and the original (W, H) per image, then the (N, R, R, 3) pixels. A worker that decodes image i
writes its pixels, its size, then its flag; any process reading a set flag gets exactly what ``Resize((R, R))``
gave (the same samples as without the cache, tests/test_image_cache.py). The file is mapped shared, so the
loader's worker processes and the processes of one node fill and read one copy (CUB: 2.3 GB at R = 256; the
page cache keeps it in memory when it fits). It is keyed by the image paths, not their contents: delete it if
images change in place. train.py removes it at the end of a finished run; an interrupted run keeps it for
--resume.
"""
import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np

from utils.errors import DataError

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None

_logger = logging.getLogger("sat")
HEADER_ALIGN = 4096


def header_bytes(num_images):
    """Flags (1 byte) and original (W, H) (2 x int32) per image, padded to a page."""
    return -(-num_images * 9 // HEADER_ALIGN) * HEADER_ALIGN


def cache_bytes(num_images, size):
    return header_bytes(num_images) + num_images * size * size * 3


def unfilled_bytes(folder):
    """Disk space the cache files in ``folder`` have yet to take (they are sparse until filled)."""
    return sum(max(0, stat.st_size - stat.st_blocks * 512) for stat in (path.stat() for path in folder.glob("*.cache")))


class ImageCache:
    """Pixels of ``num_images`` images resized to ``size`` x ``size``, by dataset index."""

    def __init__(self, path, num_images, size):
        self.path, self.num_images, self.size = Path(path), int(num_images), int(size)
        self.sizes_offset = self.num_images
        self.pixels_offset = header_bytes(self.num_images)
        self.nbytes = cache_bytes(self.num_images, self.size)
        self._create()
        self._map = None

    def _create(self):
        """Create the file unless it exists, its disk space taken at once (``reserve``); atomic, so that
        concurrent processes of one run end up with one file (attach_image_cache lets one process at a time make
        a node's caches). OSError ENOSPC where the disk has no room (a file left sparse by an interrupted run: its
        holes taken now)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if self.path.stat().st_size != self.nbytes:
                raise DataError(f"image cache {self.path} has {self.path.stat().st_size} bytes, expected "
                                f"{self.nbytes}: delete it (the run writes it again)")
            fd = os.open(self.path, os.O_RDWR)
            try:
                reserve(fd, self.nbytes)
            finally:
                os.close(fd)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            try:
                os.ftruncate(fd, self.nbytes)
                reserve(fd, self.nbytes)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)  # (fails if another process created it first: use theirs)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)  # (where the reservation failed: the space it took is given back)

    def _arrays(self):
        if self._map is None:  # opened lazily in each process (a worker maps the file itself)
            raw = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(self.nbytes,))
            self._map = (raw[:self.num_images],
                         raw[self.sizes_offset:self.sizes_offset + self.num_images * 8].view(np.int32).reshape(-1, 2),
                         raw[self.pixels_offset:].reshape(self.num_images, self.size, self.size, 3))
        return self._map

    def get(self, index):
        """``(pixels (R, R, 3) uint8, (W, H))`` of image ``index``, or None when it is not cached yet."""
        flags, sizes, pixels = self._arrays()
        if not flags[index]:
            return None
        return np.array(pixels[index]), tuple(int(v) for v in sizes[index])

    def put(self, index, pixels, size):
        flags, sizes, cached = self._arrays()
        cached[index] = pixels
        sizes[index] = size
        flags[index] = 1  # last: a reader never sees the flag before the pixels

    def num_cached(self):
        return int(np.count_nonzero(self._arrays()[0]))

    def __getstate__(self):  # workers started by spawn map the file themselves
        return {**self.__dict__, "_map": None}


@contextlib.contextmanager
def _one_at_a_time(lock_path):
    """An exclusive flock on ``lock_path`` for the block (none where fcntl is missing)."""
    if fcntl is None:
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _linux_fallocate():
    """Linux's fallocate(2) (mode 0), or None elsewhere. Not os.posix_fallocate: where the file system lacks the
    call (NFSv3, FUSE, ZFS before 2.2), glibc's posix_fallocate writes a byte into every 4 KiB block instead (a
    read and a write per block: 25 million of each for a 100 GB cache, over the network on NFS, again at each
    --resume), and may zero a byte another process has just written."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return call


_FALLOCATE = _linux_fallocate()


def reserve(fd, nbytes):
    """Allocate the disk space of the file ``fd`` (``nbytes``) now. A sparse file is filled through a shared
    map, and a write to a mapped page the disk has no room for kills the process with SIGBUS, without a word
    (a checkpoint written meanwhile took the room that the check in attach_image_cache had found): here, a
    full disk is an OSError before the run uses the cache. A file system without the call keeps the file sparse."""
    while True:
        if _FALLOCATE is not None:
            code = 0 if _FALLOCATE(fd, 0, 0, nbytes) == 0 else ctypes.get_errno()
        elif hasattr(os, "posix_fallocate"):  # (not Linux: the system's own call, no emulation)
            try:
                os.posix_fallocate(fd, 0, nbytes)
                code = 0
            except OSError as err:
                code = err.errno
        else:
            return
        if code != errno.EINTR:
            break
    if code and code not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        raise OSError(code, os.strerror(code))


def cache_name(dataset, size):
    """File name of a dataset's cache: this machine's name (the processes of one node share a file; nodes
    never share one, even in a folder on a network file system) and a digest of the image paths (in
    order) and the resize size."""
    digest = hashlib.sha1(str(size).encode())
    for index in range(len(dataset)):
        digest.update(os.fsencode(dataset.image_path(index)) + b"\0")  # (file names need not be UTF-8)
    return f"{socket.gethostname()}-{digest.hexdigest()[:16]}_{size}px.cache"


def readable_size(nbytes):
    """``nbytes`` in the largest unit of GB, MB, KB it reaches ('6.2 MB'): the demo's caches, in GB, were all
    '0.0 GB' ('has 0.0 GB free, its image caches need 0.0 GB more')."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def attach_image_cache(dataset, folder, said=None):
    """Give ``dataset`` (a WSOLDataset) an ImageCache under ``folder`` when its transform reads only the
    ``Resize((R, R))`` of each image (TrainPixels, EvalPixels of protocol sat / cls); returns the cache,
    or None (logged) for a transform that needs the original image (the wsol view of the whole image) or its
    file (``gpu_decode``), or when the disk has no room for it (a warning; the run goes on uncached). ``said``:
    the cache files logged already (two loaders of one split share one), to which this one is added."""
    resize_size = getattr(dataset.transform, "cache_size", None)
    if resize_size is None:
        why = "--gpu-decode decodes on the device" if getattr(dataset.transform, "gpu_decode", False) else \
            "the wsol view resizes the original image"
        _logger.info("cache_images: not for the loader of %d images (%s)", len(dataset), why)
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / cache_name(dataset, resize_size)
    # A write to a mapped page the disk has no room for kills the worker (SIGBUS): check first, counting the
    # caches of this folder not filled yet (the other splits, another run's). One process at a time: the room
    # another process of the node took for the file it was making was not there for the others, which then read
    # the files.
    with _one_at_a_time(folder / ".create.lock"):
        needed = unfilled_bytes(folder) + (0 if path.exists() else cache_bytes(len(dataset), resize_size))
        free = shutil.disk_usage(folder).free
        if needed > free:
            _logger.warning("cache_images: not for the loader of %d images: %s has %s free, its image caches "
                            "need %s more (free some space or use a --output-dir on a larger disk)",
                            len(dataset), folder, readable_size(free), readable_size(needed))
            return None
        try:
            dataset.cache = ImageCache(path, len(dataset), resize_size)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            _logger.warning("cache_images: not for the loader of %d images: %s has no room for its %s (%s; "
                            "free some space or use a --output-dir on a larger disk)", len(dataset), folder,
                            readable_size(cache_bytes(len(dataset), resize_size)), err.strerror)
            return None
    if said is not None:
        if path in said:
            return dataset.cache
        said.add(path)
    _logger.info("cache_images: %d images at %dx%d in %s (%s when full, %d cached)", len(dataset), resize_size,
                 resize_size, dataset.cache.path, readable_size(dataset.cache.nbytes), dataset.cache.num_cached())
    return dataset.cache
