"""Reading single images and writing result TIFFs without leaving half-written files."""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile

from .normalize import ImageError


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF (any page layout) or PNG/JPEG; a clear error for missing or corrupt files,
    including a TIFF cut short, of which tifffile would return the planes it could still read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            data = _read_tiff(path)
        else:
            from skimage import io as skio

            data = np.asarray(skio.imread(path))
    except ImageError:
        raise
    except Exception as exc:  # tifffile/zlib/imageio raise many types for damaged files
        raise ValueError(f"{path} is not a readable image (corrupt or truncated?): {exc}") from exc
    if data.size == 0:
        raise ValueError(f"{path} is not a readable image (corrupt or truncated?): it holds no pixel data")
    return data


def _read_tiff(path: Path) -> np.ndarray:
    tf, _ = open_tiff(path)
    with tf, _TiffLog() as log:
        data = tf.asarray()
        log.check(path, len(tf.pages))
    return data


def open_tiff(path: Path):
    """``(TiffFile, its first series)`` once the damage tifffile only logs is ruled out: a broken
    page chain, a stack shorter than its own metadata says, strips past the end of the file
    (:class:`ImageError`); the caller closes the file. Other failures propagate as tifffile
    raises them."""
    with _TiffLog() as log:
        tf = tifffile.TiffFile(path)
        try:
            n_pages = len(tf.pages)  # walks the whole IFD chain: a cut-off chain shows here
            series = tf.series
            log.check(path, n_pages)
            if not series:
                raise ImageError(f"{path} contains no image data")
            _check_tiff_data(path, series[0])
        except BaseException:
            tf.close()
            raise
    return tf, series[0]


class ImageWarning(UserWarning):
    """A file was read although tifffile reported a problem that does not touch its pixel data
    (a malformed metadata tag, say, as some acquisition or editing software writes them)."""


# Tags that locate or shape the pixel data: a problem reading one of them is damage.
_DATA_TAGS = frozenset({256, 257, 258, 259, 273, 277, 278, 279, 284, 317, 322, 323, 324, 325, 330, 338, 339})
# What tifffile logs about metadata only (its tag and vendor-metadata parsers): the pixels are read
# as usual, so such a file is read with a warning instead of being refused as damaged.
_METADATA_ONLY = re.compile(
    r"metadata> (raised|failed)|<tifffile\.read_(uic|lsm|json|utf8|colormap|tvips|"
    r"micromanager)|olympus_ini_metadata|STK Datetime|<get_resolution>|GDAL_NODATA|GeoKeyDirectoryTag|"
    r"_tags> raised|eer_xml_metadata|invalid self\.subfiletype"
)
_TAG_CODE = re.compile(r"<tifffile\.TiffTag (\d+) @\d+>|<tifffile\.read_tags> .*tag #(\d+)")


def is_metadata_problem(message: str) -> bool:
    """Whether a tifffile log ``message`` concerns metadata only (not the pixel data or the page
    structure). Anything not known to be harmless counts as damage."""
    if _METADATA_ONLY.search(message):
        return True
    tag = _TAG_CODE.search(message)
    return tag is not None and int(tag.group(1) or tag.group(2)) not in _DATA_TAGS


class _TiffLog(logging.Handler):
    """Collects what tifffile logs while a file is read (it logs, not raises, on damage such
    as a broken page chain or a stack shorter than its own metadata says). Problems with
    metadata only become an :class:`ImageWarning`; anything else refuses the file."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def check(self, path: Path, n_pages: int) -> None:
        damage = [m for m in self.messages if not is_metadata_problem(m)]
        if damage:
            raise ImageError(f"{path} is truncated or corrupt ({n_pages} readable pages): {damage[0]}")
        for message in dict.fromkeys(self.messages):  # once each, in order
            warnings.warn(f"{path}: read despite a metadata problem: {message}", ImageWarning, stacklevel=3)
        self.messages.clear()

    def __enter__(self) -> "_TiffLog":
        self._logger = logging.getLogger("tifffile")
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False  # reported through ImageError instead of stderr
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


def _check_tiff_data(path: Path, series) -> None:
    """Catch truncation up front: every strip/tile of ``series`` must lie inside the file."""
    size = path.stat().st_size
    for page in series.pages:
        if page is None:
            continue
        offsets = getattr(page, "dataoffsets", None) or ()
        counts = getattr(page, "databytecounts", None) or ()
        for off, n in zip(offsets, counts):
            if off + n > size:
                raise ImageError(
                    f"{path} is truncated: image data ends at byte {off + n} but the file has {size} bytes"
                )


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """Open a temporary file beside ``path`` for writing; on success fsync and rename it over
    ``path``, on any error remove it. ``path`` is either the complete new file or untouched.

    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask), or
    those of the file it replaces (``mkstemp``'s ``0o600`` would hide results from the rest of a
    lab on a shared disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        # opened by name (not os.fdopen): writers such as tifffile use the file's name
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_temporary(path: Path) -> str:
    """Create a new empty file beside ``path`` (exclusive, so never someone else's) with the
    mode of an existing ``path`` or else the default mode under the process's umask."""
    try:
        keep_mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        keep_mode = None
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            continue
        try:
            if keep_mode is not None:
                os.fchmod(fd, keep_mode)
        finally:
            os.close(fd)
        return str(tmp)
    raise FileExistsError(f"could not create a temporary file beside {path}")


class PartlyReplaced(Exception):
    """:meth:`FileSet.commit` renamed some files into place, then a rename failed (``error``):
    the set on disk is mixed."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class FileSet:
    """New versions of a set of files that belong together (a mask and its uncertainty, a
    batch result and its metadata), each written under a temporary name beside its final one
    (same folder, so the rename cannot copy) and flushed to disk; :meth:`commit` renames them
    into place in the order they were opened, :meth:`discard` removes those not renamed.

    Until ``commit`` the old set is untouched: a full disk fails while writing a temporary file,
    never halfway through the set. A rename failing after others succeeded (renames need no
    space) raises :class:`PartlyReplaced`."""

    def __init__(self) -> None:
        self.temps: dict[Path, Path] = {}

    @contextmanager
    def open(self, final: Path, mode: str = "wb", **open_kwargs):
        # exclusive, with the mode a plain open (or the file it replaces) would have
        tmp = Path(_create_temporary(final))
        self.temps[final] = tmp
        # opened by name (not os.fdopen): writers such as tifffile use the file's name
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        folders = {final.parent for final in self.temps}
        renamed = 0
        try:
            for final, tmp in list(self.temps.items()):
                os.replace(tmp, final)
                del self.temps[final]
                renamed += 1
        except OSError as exc:
            if renamed:
                raise PartlyReplaced(exc) from exc
            raise
        for folder in folders:
            _fsync_dir(folder)

    def discard(self) -> None:
        for tmp in self.temps.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        self.temps.clear()


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_in_the_way(path: Path) -> Path | None:
    """The file, ``path`` itself or one of its parents, that keeps ``path`` from being a folder
    (the nearest of them that exists is not a folder), or None. "File exists" from mkdir would
    not say which."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def os_reason(exc: OSError) -> str:
    """What the system says went wrong, as part of a sentence: 'no space left on device'."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:]


def prepare_output_folder(out: Path) -> bool:
    """Create the folder ``out`` if needed and check that files can be created in it, before
    any work that would write there; returns whether it was created here (a folder created
    for a check that then failed is removed). Raises ValueError naming the folder."""
    blocker = file_in_the_way(out)
    if blocker == out:
        raise ValueError(f"output folder {out} is a file, not a folder")
    if blocker is not None:
        raise ValueError(f"output folder {out} cannot be created: {blocker} is a file, not a folder")
    existed = out.is_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ruac-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if not existed:
            remove_if_empty(out)
        raise ValueError(f"output folder {out} is not writable: {os_reason(exc)}") from exc
    return not existed


def remove_if_empty(path: Path) -> None:
    """Remove the folder ``path`` if it is empty (anything else: leave it)."""
    try:
        path.rmdir()
    except OSError:
        pass


def write_tiff_atomic(path: str | os.PathLike, data: np.ndarray, **kwargs) -> Path:
    """Write ``data`` as a TIFF without ever leaving a half-written ``path``.

    Grey pages unless ``photometric`` says otherwise: our outputs (masks, labels, uncertainty)
    are never colour, and tifffile would otherwise store a stack of 3 or 4 planes as the
    colour samples of one RGB(A) page, which Fiji shows as a colour image."""
    kwargs.setdefault("photometric", "minisblack")
    with atomic_file(path) as f:
        tifffile.imwrite(f, data, **kwargs)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file via a temporary file and a rename (never half-written)."""
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)
