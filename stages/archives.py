"""Safe extraction of zip and tar archives, and file checksums.

Downloaded archives are hostile until proven otherwise: an entry may try to write outside the
dataset folder (`../x`, `/etc/x`), be a link or a device, or expand to far more than it weighs.
Such entries are refused and reported, never silently skipped; so are entries
that would overwrite a file already extracted (two entries of one path: the first is kept),
entries whose names are not UTF-8 (an old tar's Latin-1: DVC cannot record them), encrypted entries, and entries compressed in a way Python cannot read (Deflate64). A zip entry that would expand
past BOMB_MIN_BYTES at more than BOMB_RATIO times its compressed size (a zip bomb's signature;
images barely compress) is refused before a byte of it is written. Extraction stops once the
bytes really written would pass a bound: DEFAULT_MAX_BYTES, or the free space on the disk less
a margin, whichever is smaller, so that no archive can fill the disk.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from stages.errors import UserError

# Generous for the course's largest dataset (HAM10000 is about 3 GB extracted), small enough that
# a zip bomb cannot fill the disk.
DEFAULT_MAX_BYTES = 64 * 1024**3
# Left free on the disk whatever an archive holds.
FREE_MARGIN_BYTES = 1024**3
# A zip entry larger than this that compresses better than this ratio is refused.
BOMB_MIN_BYTES = 100 * 1024**2
BOMB_RATIO = 200
# Archives found inside the extracted data are unpacked this many levels deep (a zip quine must
# not loop for ever).
NESTED_DEPTH = 3
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# A URL's file name with one of these suffixes is the server's script (`download.php?id=3`),
# which says nothing about what it sends: the file is told by its content, as with no suffix.
SCRIPT_SUFFIXES = (".php", ".asp", ".aspx", ".ashx", ".jsp", ".cgi", ".pl", ".do", ".action", ".cfm")


class DamagedArchive(UserError):
    """extract's error for a file that is not a whole archive; `detail` says what is wrong."""

    def __init__(self, archive: Path | str, detail: str) -> None:
        super().__init__(f"{archive}: not a readable archive ({detail}); download it again")
        self.detail = detail


@dataclass
class Extraction:
    files: int = 0
    bytes: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)


# A pinned checksum's form (downloads' sha256 pins, a local source's).
SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def archive_format(path: Path) -> str | None:
    """"zip" or "tar" (compressed or not) for an archive file, else None. By the name's suffix; a
    name with no suffix at all (Figshare's /ndownloader/files/<id>, Google Drive's /uc?id=...) or
    a server script's (`download.php`) by its content. A name with another suffix is not an
    archive, whatever it holds (.xlsx and .jar files are zips)."""
    name = path.name.lower()
    if name.endswith(ARCHIVE_SUFFIXES):
        return "zip" if name.endswith(".zip") else "tar"
    if not path.is_file():
        return None
    if PurePosixPath(name).suffix not in ("", *SCRIPT_SUFFIXES):
        return None
    return content_format(path)


def content_format(path: Path) -> str | None:
    """"zip" or "tar" (compressed or not) for a file whose content is an archive, whatever its name."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        # A tar with a first member: is_tarfile alone takes any file that starts with 512 zero
        # bytes (an ISO image, say) for an empty tar.
        with tarfile.open(path) as handle:
            return "tar" if handle.next() is not None else None
    except (OSError, tarfile.TarError, EOFError, zlib.error, ValueError):
        return None


def extraction_format(path: Path) -> str | None:
    """archive_format, unless the file's first bytes say otherwise: a zip saved as .tar.gz (or a
    tar.gz or a plain tar as .zip) is what it holds, which downloading it again would not change."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if any(head.startswith(magic) for magic, _, _ in STREAMS) or head[257:262] == b"ustar":
        return "tar"
    return archive_format(path)


# A compressed stream's first bytes, and what to call it.
STREAMS = ((b"\x1f\x8b", gzip.open, "gzip stream"), (b"BZh", bz2.open, "bzip2 stream"),
           (b"\xfd7zXZ\x00", lzma.open, "xz stream"))


def _gzip_fault(path: Path) -> str | None:
    """stream_fault for gzip, member by member: bytes after the last whole member that do not
    start another are ignored, as gzip(1) and tar do (Python's gzip module refuses them)."""
    inflater = zlib.decompressobj(31)
    pending = b""
    try:
        with open(path, "rb") as handle:
            while True:
                data = pending if len(pending) >= 2 else pending + handle.read(1 << 20)
                pending = b""
                if not data:
                    break
                if inflater is None:  # between members: another, or what follows the stream
                    if len(data) < 2 and (more := handle.read(1 << 20)):
                        pending = data + more
                        continue
                    if not data.startswith(b"\x1f\x8b"):
                        return None
                    inflater = zlib.decompressobj(31)
                while data:
                    inflater.decompress(data, 1 << 20)
                    data = inflater.unconsumed_tail
                    if inflater.eof:
                        pending, inflater = inflater.unused_data, None
                        break
    except zlib.error as error:
        return f"gzip stream: {' '.join(str(error).split())}"
    if inflater is not None:
        return "ends before the gzip stream's end"
    return None


def stream_fault(path: Path) -> str | None:
    """What is wrong with a gzip, bzip2 or xz file, read to its end (its end marker, and the CRC
    over all it holds), or None if nothing is, or if it is not one."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"\x1f\x8b"):
        return _gzip_fault(path)
    for magic, opener, kind in STREAMS:
        if head.startswith(magic):
            try:
                with opener(path, "rb") as stream:
                    while stream.read(1 << 20):
                        pass
            except EOFError:
                return f"ends before the {kind}'s end"
            except (lzma.LZMAError, zlib.error) as error:
                return f"{kind}: {' '.join(str(error).split())}"
            except OSError as error:
                if error.errno is not None:
                    raise  # the disk, not the data
                return f"{kind}: {' '.join(str(error).split())}"  # BadGzipFile's CRC, bz2's invalid data
            return None
    return None


def cut_short(path: Path) -> str | None:
    """What `path` holds ("zip archive", "gzip stream", ...) if it ends before that archive's or
    stream's end (a download cut short whose length the server never said), else None: complete,
    or nothing this can tell by its first bytes. Reads a zip's central directory, a compressed
    stream to its end marker (and CRC), a tar's members to the zero block that ends it."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            zipfile.ZipFile(path).close()  # the central directory is the zip's last bytes
        except zipfile.BadZipFile:
            return "zip archive"
        return None
    for magic, _, kind in STREAMS:
        if head.startswith(magic):
            fault = stream_fault(path)
            # Damaged but not cut short: the checksum or the extraction says so.
            return kind if fault is not None and fault.startswith("ends") else None
    if head.startswith(b"MZ") and (end := _executable_end(path)) is not None:
        # A self-extracting zip: a Windows executable with the zip appended after its last section.
        with open(path, "rb") as handle:
            handle.seek(end)
            appended = handle.read(4)
        if len(appended) < 4 and path.stat().st_size < end:
            return "executable"
        if appended == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            return "self-extracting zip archive"
        return None
    return "tar archive" if _tar_ends_early(path) else None


def _tar_ends_early(path: Path) -> bool:
    """Whether a plain tar (`ustar` in its first header) ends before the zero block that ends a
    tar: tarfile takes one that stops between members, or inside a header, for a whole one."""
    with open(path, "rb") as handle:
        if handle.read(512)[257:262] != b"ustar":
            return False
    try:
        with tarfile.open(path, "r:") as handle:
            for _ in handle:
                pass
            end = handle.offset
        with open(path, "rb") as raw:
            raw.seek(end)
            return raw.read(512) != bytes(512)
    except tarfile.ReadError:
        return True
    except tarfile.TarError:
        return False


def _executable_end(path: Path) -> int | None:
    """Where a Windows (PE) executable's last section ends in the file, which is where a
    self-extracting archive's appended data starts; None if the headers are not a PE's."""
    with open(path, "rb") as handle:
        handle.seek(0x3C)
        at = int.from_bytes(handle.read(4), "little")
        handle.seek(at)
        header = handle.read(24)
        if len(header) < 24 or not header.startswith(b"PE\0\0"):
            return None
        sections = int.from_bytes(header[6:8], "little")
        handle.seek(at + 24 + int.from_bytes(header[20:22], "little"))
        table = handle.read(40 * sections)
    if not sections or len(table) < 40 * sections:
        return None
    return max(int.from_bytes(table[i + 20:i + 24], "little") + int.from_bytes(table[i + 16:i + 20], "little")
               for i in range(0, len(table), 40))


def is_archive(path: Path) -> bool:
    return path.is_file() and archive_format(path) is not None


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path an entry may be written to (`.` for the folder itself), or None if it
    points outside."""
    if not name.strip():
        return None
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or (posix.parts and ":" in posix.parts[0]):
        return None
    if any(part == ".." for part in posix.parts):
        return None
    parts = [part for part in posix.parts if part not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def extract(archive: Path, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES, spent: int = 0,
            name: str = "") -> Extraction:
    """Extract `archive` into `dest`, refusing unsafe entries; raise UserError on a bad archive.
    `spent`: bytes already written toward `max_bytes` (by the archives this one came inside or
    beside); `name`: what to call the archive in an error (its path, if not given)."""
    name = name or str(archive)
    dest.mkdir(parents=True, exist_ok=True)
    room = shutil.disk_usage(dest).free - FREE_MARGIN_BYTES
    if room < max_bytes - spent:
        max_bytes = max(room, 0)
        # Named by the file system's mount point, as `df` names it: `dest` may be a folder the failed fetch deletes.
        refusal = (f"{name}: expands past the free space on {mount_point(dest)} ({max_bytes:,} bytes, keeping "
                   f"{FREE_MARGIN_BYTES // 1024**3} GiB free); refusing it: free some space there and run again "
                   "(or it is a zip bomb)")
    else:
        # A fixed limit: free space would not move it.
        earlier = f" with the {spent:,} bytes extracted before it" if spent else ""
        refusal = (f"{name}: expands past the {max_bytes:,}-byte limit{earlier}; refusing it (a zip bomb's sign; a "
                   "dataset that large has to be extracted by hand and fetched as a `local` folder)")
        max_bytes -= spent
    try:
        if extraction_format(archive) == "zip":
            return _extract_zip(archive, dest, max_bytes, refusal)
        # tarfile stops at the tar's end, before a compressed stream's CRC: a changed byte in
        # stored data would be extracted unseen, and a damaged .xz or .bz2 raises its own errors.
        if fault := stream_fault(archive):
            raise DamagedArchive(name, fault)
        if _tar_ends_early(archive):  # else what came before the cut would be extracted, and the rest lost unsaid
            raise DamagedArchive(name, "ends before the tar archive's end")
        return _extract_tar(archive, dest, max_bytes, refusal)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        # A zip cut short lacks its central directory, which zipfile calls 'File is not a zip file'.
        kind = cut_short(archive)
        raise DamagedArchive(name, f"ends before the {kind}'s end" if kind else " ".join(str(error).split())) from None
    except (IsADirectoryError, FileExistsError, NotADirectoryError) as error:
        # Entries that clash (a file `a` and a folder `a/`) are refused one by one (_clash): this
        # is a layout the file system refuses all the same.
        raise UserError(f"{name}: entries clash at {error.filename}; the archive is malformed") from None


def holds_no_tar(path: Path) -> bool:
    """Whether a file named `.tar` holds no tar, plain or compressed: PyTorch's `checkpoint.pth.tar`
    and `model_best.pth.tar` (a pickle, or a zip of records since torch 1.6). A tar cut short or
    otherwise damaged still has its `ustar` (or its stream's) magic, and is not this."""
    if not path.name.lower().endswith(".tar"):
        return False
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[257:262] == b"ustar" or any(head.startswith(magic) for magic, _, _ in STREAMS):
        return False
    try:
        with tarfile.open(path, "r:") as handle:  # an old (v7) tar has no magic
            return handle.next() is None
    except (tarfile.TarError, EOFError, ValueError):
        return True


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (an existing folder)."""
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def unpack_nested(dest: Path, spent: int = 0, max_bytes: int = DEFAULT_MAX_BYTES, source: str = "",
                  remedy: str = "replace it with a whole copy where the source keeps it, and run fetch again"
                  ) -> list[dict[str, str]]:
    """Extract the archives lying in the extracted or copied data under `dest` (told by their
    names' suffixes: train.zip, images.tar.gz, Kaggle's train.csv.zip; not hidden ones, nor a
    `.tar` that holds no tar, holds_no_tar), each
    into its own folder, as `unzip` would, and delete it; then the archives those held,
    NESTED_DEPTH levels in all.
    Each is extracted as safely as the outer one, and the bytes of all count against the one
    `max_bytes` (`spent`: those the outer extraction wrote). The entries refused, returned, carry
    the inner archive's path: {"archive": "parts/train.zip", "entry": ..., "reason": ...}.

    An inner archive that is not readable stops the fetch in one line naming it by its path in
    `source` (what the user calls the outer archive or folder) and saying `remedy`: the source
    itself holds it damaged (the outer download was verified, or is the user's own file), so
    "download it again" would give the same bytes."""
    refused: list[dict[str, str]] = []
    for _ in range(NESTED_DEPTH):
        # Hidden ones are a system's, not data (macOS's `._train.zip` beside train.zip is its
        # metadata, no zip): left as they are, as validate sets them aside (layouts.not_an_image).
        nested = sorted(
            p for p in dest.rglob("*")
            if p.name.lower().endswith(ARCHIVE_SUFFIXES) and p.is_file() and not p.is_symlink()
            and not any(part.startswith(".") for part in p.relative_to(dest).parts) and not holds_no_tar(p)
        )
        if not nested:
            break
        for inner in nested:
            name = inner.relative_to(dest).as_posix()
            where = f" inside {source}" if source else ""
            # Moved aside first, its suffix kept: an entry of its own name (images.zip zipped
            # again as images.zip) would be refused as a duplicate of it, then deleted with it.
            aside = inner.rename(inner.with_name(f".unpacking-{inner.name}"))
            try:
                extraction = extract(aside, inner.parent, max_bytes, spent, name=f"{name}{where}")
            except DamagedArchive as error:
                raise UserError(f"{name}{where}: not a readable archive ({error.detail}); "
                                f"the source itself holds it damaged, so fetching again gives the same bytes: {remedy}"
                                ) from None
            spent += extraction.bytes
            refused += [{"archive": name, **item} for item in extraction.refused]
            aside.unlink()
    return refused


def _refuse(result: Extraction, entry: str, reason: str) -> None:
    result.refused.append({"entry": entry, "reason": reason})


def _check_budget(result: Extraction, size: int, max_bytes: int, refusal: str) -> None:
    if result.bytes + size > max_bytes:
        raise UserError(refusal)


# What zipfile can decompress; Deflate64 (method 9, written by Windows for large zips) and the
# rest are refused entry by entry, with the method named.
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
ZIP_METHOD_NAMES = {9: "Deflate64", 12: "bzip2", 14: "LZMA", 93: "Zstandard", 95: "xz", 96: "JPEG", 98: "PPMd", 99: "AES"}
DUPLICATE = "duplicate: an earlier entry has the same path, and it is kept"
NOT_UTF8_ENTRY = ("unusable name: not UTF-8 (DVC cannot record it); extract the archive yourself, rename its files "
                  "(convmv -r -f latin1 -t utf8 --notest), and fetch the folder as a local source")


def is_utf8(name: str) -> bool:
    """Whether a name as Python read it from the file system or a tar holds only UTF-8: bytes
    that are not come back as surrogates (os.fsdecode's surrogateescape)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clashes(out: Path) -> bool:
    """Whether `out` was already written (an earlier entry of the same path, such as `a.png`
    and `./a.png`, or another archive's file): overwriting it would lose that file unrecorded."""
    return out.is_file() or out.is_symlink()


def _clash(dest: Path, target: PurePosixPath, folder: bool) -> str | None:
    """Why an entry cannot be laid out under `dest` beside what is already there, or None: a
    folder it needs is a file (a source's file `train` beside its train.zip of `train/...`), or a
    file entry's path is a folder, or a file (DUPLICATE). What is there is kept."""
    for above in [*reversed(target.parents[:-1]), *([target] if folder else [])]:
        if _clashes(dest / above):
            return f"clashes with the file {above}, already there: a folder cannot take its name; the file is kept"
    if folder:
        return None
    if (dest / target).is_dir():
        return f"clashes with the folder {target}, already there; the folder is kept"
    return DUPLICATE if _clashes(dest / target) else None


def _extract_zip(archive: Path, dest: Path, max_bytes: int, refusal: str) -> Extraction:
    result = Extraction()
    with zipfile.ZipFile(archive) as handle:
        for info in handle.infolist():
            target = safe_member_path(info.filename)
            if target is None:
                _refuse(result, info.filename, "path outside the dataset folder")
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                _refuse(result, info.filename, "symbolic link")
                continue
            if info.is_dir():
                if (clash := _clash(dest, target, folder=True)) is not None:
                    _refuse(result, info.filename, clash)
                else:
                    (dest / target).mkdir(parents=True, exist_ok=True)
                continue
            if info.flag_bits & 0x1:
                _refuse(result, info.filename, "encrypted (the zip needs a password); extract it yourself and "
                                               "use the folder as a local source")
                continue
            if info.compress_type not in ZIP_METHODS:
                method = ZIP_METHOD_NAMES.get(info.compress_type, "unknown")
                _refuse(result, info.filename, f"compressed with method {info.compress_type} ({method}), which Python "
                                               "cannot read; re-pack the archive with standard deflate")
                continue
            if (clash := _clash(dest, target, folder=False)) is not None:
                _refuse(result, info.filename, clash)
                continue
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > BOMB_MIN_BYTES and ratio > BOMB_RATIO:
                _refuse(result, info.filename, f"expands to {info.file_size:,} bytes from {info.compress_size:,}"
                                               f" ({ratio:,.0f}:1, a zip bomb's ratio)")
                continue
            _check_budget(result, info.file_size, max_bytes, refusal)
            out = dest / target
            out.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with handle.open(info) as source, open(out, "wb") as sink:
                # The declared size can lie; count what really comes out.
                while block := source.read(1 << 20):
                    written += len(block)
                    _check_budget(result, written, max_bytes, refusal)
                    sink.write(block)
            result.files += 1
            result.bytes += written
    return result


def _extract_tar(archive: Path, dest: Path, max_bytes: int, refusal: str) -> Extraction:
    result = Extraction()
    with tarfile.open(archive) as handle:
        for member in handle:
            target = safe_member_path(member.name)
            if target is None:
                _refuse(result, member.name, "path outside the dataset folder")
                continue
            if member.issym() or member.islnk():
                _refuse(result, member.name, "link")
                continue
            if not is_utf8(member.name):
                _refuse(result, member.name, NOT_UTF8_ENTRY)
                continue
            if member.isdir():
                if (clash := _clash(dest, target, folder=True)) is not None:
                    _refuse(result, member.name, clash)
                else:
                    (dest / target).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                _refuse(result, member.name, "device, fifo or other special file")
                continue
            if (clash := _clash(dest, target, folder=False)) is not None:
                _refuse(result, member.name, clash)
                continue
            _check_budget(result, member.size, max_bytes, refusal)
            out = dest / target
            out.parent.mkdir(parents=True, exist_ok=True)
            source = handle.extractfile(member)
            assert source is not None  # a regular file always has data
            with source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            result.files += 1
            result.bytes += member.size
    return result
