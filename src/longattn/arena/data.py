"""Text for the arena: Jane Austen's novels and synthetic haystacks.

Two sources of long English text:

* **Jane Austen's six novels**, taken from Debian's ``r-cran-janeaustenr`` package. The package
  stores them in an R lazy-load database; :func:`fetch_austen` downloads the ``.deb`` with
  ``apt-get download``, unpacks it, reads the database with the small R-serialization reader in
  this module (no R needed) and writes one UTF-8 text file per novel under
  ``data_dir()/austen/``. Used for perplexity and as a natural-language haystack.
* **Synthetic filler** built in code, so the arena also runs where the novels cannot be had:
  ``"synthetic"`` (seeded, varied plain sentences) and ``"repeat"`` (the fixed five-sentence
  filler of the passkey test of Mohtashami & Jaggi, 2023, also RULER's "noise" haystack).

:func:`haystack` returns filler text of a given length in tokens of a given tokenizer; the
task generators in :mod:`longattn.arena.tasks` use :func:`haystack_pieces`, the same text split
at the sentence boundaries where needles may be inserted.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "DataNotAvailable",
    "DataFallbackWarning",
    "HAYSTACK_KINDS",
    "NOVELS",
    "data_dir",
    "austen_dir",
    "austen_available",
    "fetch_austen",
    "austen_novels",
    "austen_text",
    "resolve_haystack_kind",
    "haystack",
    "haystack_pieces",
    "count_tokens",
    "read_lazyload_db",
    "unserialize_r",
]

DEBIAN_PACKAGE = "r-cran-janeaustenr"
FETCH_HINT = (
    "fetch them once with `longattn data` (or `make data`); that runs "
    f"`apt-get download {DEBIAN_PACKAGE}` and unpacks it, no R needed"
)

# (name of the R object in janeaustenr, file stem, title), in order of publication
NOVELS: tuple[tuple[str, str, str], ...] = (
    ("sensesensibility", "sense_and_sensibility", "Sense and Sensibility"),
    ("prideprejudice", "pride_and_prejudice", "Pride and Prejudice"),
    ("mansfieldpark", "mansfield_park", "Mansfield Park"),
    ("emma", "emma", "Emma"),
    ("northangerabbey", "northanger_abbey", "Northanger Abbey"),
    ("persuasion", "persuasion", "Persuasion"),
)

HAYSTACK_KINDS = ("auto", "austen", "synthetic", "repeat")


class DataNotAvailable(RuntimeError):
    """A data set the arena needs is not on this machine; the message says how to get it."""


class DataFallbackWarning(UserWarning):
    """The arena used synthetic text because Jane Austen's novels are not on this machine."""


# --------------------------------------------------------------------------------------------
# where the data lives


def data_dir() -> Path:
    """Root of the arena's data: ``$LONGATTN_DATA``, else ``~/.cache/longattn/data``."""
    env = os.environ.get("LONGATTN_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longattn" / "data"


def austen_dir() -> Path:
    """Folder holding one ``<novel>.txt`` per novel."""
    return data_dir() / "austen"


def _novel_paths(folder: Path) -> list[Path]:
    return [folder / f"{stem}.txt" for _, stem, _ in NOVELS]


def austen_available() -> bool:
    """True when all six novels have been fetched into :func:`austen_dir`."""
    return all(p.is_file() for p in _novel_paths(austen_dir()))


# --------------------------------------------------------------------------------------------
# fetching the Debian package


def fetch_austen(dest: str | os.PathLike | None = None, *, deb: str | os.PathLike | None = None,
                 force: bool = False) -> Path:
    """Put Jane Austen's six novels, one UTF-8 text file each, into ``dest``.

    ``dest`` defaults to :func:`austen_dir`. Idempotent: returns at once when the files are
    already there (``force=True`` rewrites them). The text comes from, in order of preference,
    ``deb`` (a ``r-cran-janeaustenr`` ``.deb`` file you downloaded), an installed R package
    (``/usr/lib/R/site-library/janeaustenr``), or ``apt-get download r-cran-janeaustenr``
    (with one ``apt-get update`` and a retry if the package lists are missing and we are root).
    A downloaded ``.deb`` is kept in ``dest`` too. Raises :class:`DataNotAvailable` naming
    the command that failed.
    """
    dest = Path(dest) if dest is not None else austen_dir()
    if not force and all(p.is_file() for p in _novel_paths(dest)):
        return dest
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longattn-austen-") as tmp:
        tmp_path = Path(tmp)
        installed = _installed_package_root()
        if deb is not None:
            source = str(deb)
            package_root = _unpack_deb(Path(deb), tmp_path / "root")
        elif installed is not None:
            package_root, source = installed, str(installed)
        else:
            deb_file = _apt_download(tmp_path)
            source = deb_file.name
            package_root = _unpack_deb(deb_file, tmp_path / "root")
        objects = _read_novels(package_root)
        version = _package_version(package_root)
        dest.mkdir(parents=True, exist_ok=True)
        if deb is None and package_root.is_relative_to(tmp_path):
            # keep the package beside the texts: provenance, and an offline re-extract
            for old in dest.glob(f"{DEBIAN_PACKAGE}_*.deb"):
                old.unlink()
            shutil.copy2(deb_file, dest / deb_file.name)
    chars = {}
    for (name, stem, _), path in zip(NOVELS, _novel_paths(dest)):
        text = "\n".join(line or "" for line in objects[name]).strip("\n") + "\n"
        _write_atomic(path, text)
        chars[stem] = len(text)
    manifest = {
        "source": f"Debian package {DEBIAN_PACKAGE} ({source})",
        "janeaustenr_version": version,
        "characters": chars,
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_atomic(dest / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    _AUSTEN_CACHE.clear()
    return dest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _installed_package_root() -> Path | None:
    for base in ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library"):
        root = Path(base) / "janeaustenr"
        if (root / "data" / "Rdata.rdb").is_file() or (root / "R" / "sysdata.rdb").is_file():
            return root
    return None


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _apt_download(tmp: Path) -> Path:
    command = f"apt-get download {DEBIAN_PACKAGE}"
    if shutil.which("apt-get") is None:
        raise DataNotAvailable(
            f"cannot fetch Jane Austen's novels: `apt-get` is not on this machine. Download the "
            f"Debian package {DEBIAN_PACKAGE} (any version) elsewhere and pass it: "
            "fetch_austen(deb='r-cran-janeaustenr_..._all.deb')"
        )
    result = _run(["apt-get", "download", DEBIAN_PACKAGE], tmp)
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # usually "Unable to locate package": the package lists were never downloaded
        _run(["apt-get", "update", "-qq"], tmp)
        result = _run(["apt-get", "download", DEBIAN_PACKAGE], tmp)
    debs = sorted(tmp.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataNotAvailable(
            f"`{command}` failed ({' | '.join(detail) or f'exit {result.returncode}'}). Run "
            f"`apt-get update && {command}` yourself (as root, with access to a Debian mirror) "
            "and pass the file: fetch_austen(deb='r-cran-janeaustenr_..._all.deb')"
        )
    return debs[-1]


def _unpack_deb(deb: Path, root: Path) -> Path:
    """Unpack a .deb (``dpkg-deb -x`` when present, else Python's ar + tar) and return the
    folder of the R package ``janeaustenr`` inside it."""
    if not deb.is_file():
        raise DataNotAvailable(f"{deb} does not exist")
    root.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb"):
        result = _run(["dpkg-deb", "-x", str(deb.resolve()), str(root)], root)
        if result.returncode != 0:
            raise DataNotAvailable(f"`dpkg-deb -x {deb} DIR` failed: {result.stderr.strip()}")
    else:
        _unpack_deb_python(deb, root)
    found = sorted(root.rglob("janeaustenr/DESCRIPTION"))
    if not found:
        raise DataNotAvailable(f"{deb} holds no R package janeaustenr")
    return found[0].parent


def _unpack_deb_python(deb: Path, root: Path) -> None:
    """A .deb is an ``ar`` archive whose ``data.tar.*`` member holds the files."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DataNotAvailable(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                        tar.extractall(root, filter="data")
                    else:
                        tar.extractall(root)
            except tarfile.TarError as exc:
                raise DataNotAvailable(
                    f"cannot unpack {name} from {deb} in Python ({exc}); install dpkg") from exc
            return
    raise DataNotAvailable(f"{deb} has no data.tar member")


def _read_novels(package_root: Path) -> dict[str, list[str]]:
    wanted = {name for name, _, _ in NOVELS}
    tried = []
    for base in (package_root / "data" / "Rdata", package_root / "R" / "sysdata"):
        if not base.with_suffix(".rdx").is_file():
            continue
        tried.append(str(base))
        objects = read_lazyload_db(base, names=wanted)
        if wanted <= objects.keys():
            return {k: list(v) for k, v in objects.items()}
    raise DataNotAvailable(
        f"the janeaustenr package at {package_root} does not hold the six novels where expected "
        f"(looked in {tried or 'no lazy-load database'})"
    )


def _package_version(package_root: Path) -> str | None:
    description = package_root / "DESCRIPTION"
    if description.is_file():
        match = re.search(r"^Version:\s*(\S+)", description.read_text(errors="replace"), re.M)
        return match.group(1) if match else None
    return None


# --------------------------------------------------------------------------------------------
# a reader for the subset of R's serialization format that data packages use


class RParseError(ValueError):
    """The bytes are not an R serialization this reader understands."""


class RSymbol(str):
    """An R symbol (a name), as opposed to a character string."""


class RVector(list):
    """An R vector, list or pairlist: its items, its R type code (``rtype``, R's SEXPTYPE)
    and its attributes (``attrs``, e.g. ``names``, ``class``). NA becomes ``None``; a pairlist's
    items are ``(tag, value)`` pairs."""

    def __init__(self, items: Any = (), rtype: int = 0, attrs: dict | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attrs = attrs or {}


# SEXPTYPE codes and the serializer's pseudo-types (R's src/main/serialize.c)
_SYM, _LIST, _CLO, _ENV, _PROM, _LANG, _SPECIAL, _BUILTIN, _CHAR = 1, 2, 3, 4, 5, 6, 7, 8, 9
_LGL, _INT, _REAL, _CPLX, _STR, _DOT, _VEC, _EXPR = 10, 13, 14, 15, 16, 17, 19, 20
_EXTPTR, _WEAKREF, _RAW, _S4 = 22, 23, 24, 25
_REF, _NILVALUE, _PERSIST, _PACKAGE, _NAMESPACE, _ALTREP = 255, 254, 247, 248, 249, 238
_MARKERS = {253: "R_GlobalEnv", 252: "R_UnboundValue", 251: "R_MissingArg",
            250: "R_BaseNamespace", 242: "R_EmptyEnv", 241: "R_BaseEnv"}
_PAIRLISTS = (_LIST, _LANG, _CLO, _PROM, _DOT)
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_NA_INTEGER = -(2 ** 31)


class _RReader:
    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos, self.refs = buf, pos, []

    def int(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise RParseError("R serialization ends early")
        (value,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise RParseError("R serialization ends early")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def length(self) -> int:
        n = self.int()
        if n == -1:  # a long vector: the length follows as two ints
            n = (self.int() << 32) + self.int()
        return n

    def attributes(self, flags: int) -> dict:
        return _tags_to_dict(self.item()) if flags & _HAS_ATTR else {}

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind == _NILVALUE:
            return None
        if kind in _MARKERS:
            return RSymbol(_MARKERS[kind])
        if kind == _REF:
            index = (flags >> 8) or self.int()
            return self.refs[index - 1]
        if kind in (_PERSIST, _PACKAGE, _NAMESPACE):
            if self.int() != 0:
                raise RParseError("unexpected header of a persistent-name string vector")
            value = RVector([self.item() for _ in range(self.int())], kind)
            self.refs.append(value)
            return value
        if kind == _SYM:
            value = RSymbol(self.item() or "")
            self.refs.append(value)
            return value
        if kind == _ENV:
            env = RVector((), _ENV)
            self.refs.append(env)  # registered before its contents, which may refer to it
            self.int()  # locked
            _enclosure, frame, hashtab, attrib = self.item(), self.item(), self.item(), self.item()
            env.attrs = {"frame": frame, "hashtab": hashtab, "attributes": attrib}
            return env
        if kind in _PAIRLISTS:
            return self.pairlist(flags)
        if kind == _ALTREP:
            info, state, attrib = self.item(), self.item(), self.item()
            value = _expand_altrep(info, state)
            value.attrs = _tags_to_dict(attrib)
            return value
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            levels = flags >> 12
            latin1 = bool(levels & (1 << 2)) and not levels & (1 << 3)
            return self.take(n).decode("latin-1" if latin1 else "utf-8", errors="replace")
        if kind in (_LGL, _INT):
            n = self.length()
            raw = struct.unpack(f">{n}i", self.take(4 * n))
            if kind == _LGL:
                values = [None if v == _NA_INTEGER else bool(v) for v in raw]
            else:
                values = [None if v == _NA_INTEGER else v for v in raw]
            return RVector(values, kind, self.attributes(flags))
        if kind == _REAL:
            n = self.length()
            return RVector(struct.unpack(f">{n}d", self.take(8 * n)), kind, self.attributes(flags))
        if kind == _CPLX:
            n = self.length()
            raw = struct.unpack(f">{2 * n}d", self.take(16 * n))
            values = [complex(a, b) for a, b in zip(raw[::2], raw[1::2])]
            return RVector(values, kind, self.attributes(flags))
        if kind in (_STR, _VEC, _EXPR):
            n = self.length()
            values = [self.item() for _ in range(n)]
            return RVector(values, kind, self.attributes(flags))
        if kind == _RAW:
            n = self.length()
            return RVector(self.take(n), kind, self.attributes(flags))
        if kind == _S4:
            return RVector((), kind, self.attributes(flags))
        if kind in (_SPECIAL, _BUILTIN):
            return RSymbol(self.take(self.int()).decode())
        if kind in (_EXTPTR, _WEAKREF):
            value = RVector((), kind)
            self.refs.append(value)
            if kind == _EXTPTR:
                self.item(), self.item()  # protected value, tag
            value.attrs = self.attributes(flags)
            return value
        raise RParseError(f"R object type {kind} (byte code or a class reference) is not supported")

    def pairlist(self, flags: int) -> RVector:
        """Read a pairlist iteratively along its CDRs (long lists would exhaust recursion)."""
        out = RVector((), flags & 0xFF)
        while True:
            attrib = self.item() if flags & _HAS_ATTR else None
            tag = self.item() if flags & _HAS_TAG else None
            out.append((tag, self.item()))
            if attrib is not None and not out.attrs:
                out.attrs = _tags_to_dict(attrib)
            flags = self.int()
            if flags & 0xFF not in _PAIRLISTS:
                self.pos -= 4
                tail = self.item()
                if tail is not None:
                    out.append((None, tail))
                return out


def _tags_to_dict(pairlist: Any) -> dict:
    if not isinstance(pairlist, RVector) or pairlist.rtype not in _PAIRLISTS:
        return {}
    return {str(tag): value for tag, value in pairlist if tag is not None}


def _expand_altrep(info: Any, state: Any) -> RVector:
    """Materialise the ALTREP classes that R writes into packages' data."""
    cls = str(info[0][1]) if isinstance(info, RVector) and info else "?"
    if cls in ("compact_intseq", "compact_realseq"):
        n, start, step = state
        values = [start + i * step for i in range(int(n))]
        if cls == "compact_intseq":
            return RVector([int(v) for v in values], _INT)
        return RVector(values, _REAL)
    if cls.startswith("wrap_") and isinstance(state, RVector):
        inner = state[0]
        return RVector(inner, inner.rtype, inner.attrs)
    if cls == "deferred_string" and isinstance(state, RVector):
        numbers = state[0][1] if state.rtype in _PAIRLISTS else state[0]
        return RVector([None if v is None else (str(int(v)) if float(v).is_integer() else repr(v))
                        for v in numbers], _STR)
    raise RParseError(f"ALTREP class {cls!r} is not supported")


def unserialize_r(data: bytes) -> Any:
    """Decode one R serialization (``serialize()``/``saveRDS()`` output, XDR format, versions
    2 and 3; gzip-compressed input such as an ``.rds`` or ``.rdx`` file is accepted).

    Character vectors become :class:`RVector` of ``str``/``None``; lists, data frames and
    numeric vectors become :class:`RVector` with their attributes. Byte code is not supported."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:2] != b"X\n":
        raise RParseError("only R's XDR (binary, big-endian) serialization format is supported")
    reader = _RReader(data, 2)
    version = reader.int()
    reader.int(), reader.int()  # the writer's R version, the oldest R that can read it
    if version == 3:
        reader.take(reader.int())  # name of the native encoding
    elif version != 2:
        raise RParseError(f"R serialization version {version} is not supported")
    return reader.item()


def read_lazyload_db(base: str | os.PathLike, names: set[str] | None = None) -> dict[str, Any]:
    """Read the objects of an R lazy-load database: ``base.rdx`` (a compressed serialized
    index of ``(offset, length)`` per object) and ``base.rdb`` (each object a 4-byte
    big-endian length followed by a compressed serialization). ``names`` limits which objects
    are decoded."""
    base = Path(base)
    index = unserialize_r(base.with_suffix(".rdx").read_bytes())
    parts = dict(zip(index.attrs.get("names", []), index)) if index.rtype == _VEC else _tags_to_dict(index)
    compressed = parts.get("compressed")
    method = compressed[0] if compressed else True
    blob = base.with_suffix(".rdb").read_bytes()
    variables = parts["variables"]
    out = {}
    for name, where in zip(variables.attrs.get("names", []), variables):
        if names is not None and name not in names:
            continue
        offset, length = int(where[0]), int(where[1])
        out[name] = unserialize_r(_lazyload_decompress(blob[offset:offset + length], method))
    return out


def _lazyload_decompress(chunk: bytes, method: Any) -> bytes:
    (size,) = struct.unpack(">I", chunk[:4])
    if method is True or method == 1:
        out = zlib.decompress(chunk[4:])
    else:  # compress = 2 (bzip2) or 3 (xz): a type byte precedes the stream
        kind, body = chunk[4:5], chunk[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if kind not in decoders:
            raise RParseError(f"unknown lazy-load compression type {kind!r}")
        out = decoders[kind](body)
    if len(out) != size:
        raise RParseError("a lazy-load object has the wrong size after decompression")
    return out


# --------------------------------------------------------------------------------------------
# reading the novels

_AUSTEN_CACHE: dict[str, Any] = {}


def austen_novels() -> dict[str, str]:
    """``{title: text}`` of the six novels as fetched (Project Gutenberg line breaks kept)."""
    folder = austen_dir()
    paths = _novel_paths(folder)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataNotAvailable(
            f"Jane Austen's novels are not in {folder} (missing {', '.join(missing)}); {FETCH_HINT}."
        )
    return {title: p.read_text(encoding="utf-8") for (_, _, title), p in zip(NOVELS, paths)}


def _unwrap(text: str) -> list[str]:
    """Paragraphs of a hard-wrapped text, each on one line with single spaces."""
    paragraphs = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if p]


def austen_text() -> str:
    """The six novels as one text: paragraphs unwrapped to one line each and separated by a
    blank line, novels in order of publication (about 3.9 million characters).

    Raises :class:`DataNotAvailable` (with the command to run) when they were not fetched."""
    key = f"text:{austen_dir()}"
    if key not in _AUSTEN_CACHE:
        novels = austen_novels()
        _AUSTEN_CACHE[key] = "\n\n".join("\n\n".join(_unwrap(t)) for t in novels.values())
    return _AUSTEN_CACHE[key]


# abbreviations after which a full stop does not end a sentence
_ABBREVIATIONS = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|St|Messrs|Col|Capt|Gen|Sir)\.$")
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+[\"'_)\]]*(?=\s)|$)\s*")


def _split_sentences(paragraph: str) -> list[str]:
    out: list[str] = []
    for piece in _SENTENCE.findall(paragraph):
        # "Mr." does not end a sentence, nor does '"Why?" said she' end at the question mark
        if out and (_ABBREVIATIONS.search(out[-1].rstrip()) or piece[0].islower()):
            out[-1] += piece
        else:
            out.append(piece)
    return out


def _austen_sentences() -> tuple[list[str], list[int]]:
    """All sentences of the novels (each ending in its separator: a space, or a blank line at
    the end of a paragraph) and the indices where paragraphs start."""
    key = f"sentences:{austen_dir()}"
    if key not in _AUSTEN_CACHE:
        sentences: list[str] = []
        starts: list[int] = []
        for paragraph in austen_text().split("\n\n"):
            pieces = [s.rstrip() for s in _split_sentences(paragraph)]
            if not pieces:
                continue
            starts.append(len(sentences))
            sentences.extend(p + " " for p in pieces[:-1])
            sentences.append(pieces[-1] + "\n\n")
        _AUSTEN_CACHE[key] = (sentences, starts)
    return _AUSTEN_CACHE[key]


# --------------------------------------------------------------------------------------------
# synthetic filler

REPEAT_FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ",
                 "Here we go. ", "There and back again. ")

_NAMES = ("Anna", "Ben", "Clara", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
          "Kira", "Leo", "Maya", "Nils", "Olga", "Pablo", "Rosa", "Samir", "Tara", "Victor")
_ADJECTIVES = ("old", "quiet", "bright", "narrow", "heavy", "gentle", "small", "wide", "cold",
               "warm", "silent", "busy", "dusty", "green", "tall", "crooked", "wooden", "pale",
               "broad", "distant", "empty", "little", "sturdy", "shady")
_NOUNS = ("river", "garden", "window", "bridge", "market", "letter", "lantern", "orchard",
          "kettle", "meadow", "station", "harbor", "village", "cottage", "carriage", "library",
          "forest", "basket", "ladder", "chapel", "hillside", "fountain", "mill", "barn")
_PLACES = ("the square", "the old road", "the northern shore", "the edge of town",
           "the top of the hill", "the market hall", "the far field", "the quiet lane")
_PAST_VERBS = ("painted", "carried", "found", "cleaned", "visited", "repaired", "watched",
               "passed", "described", "noticed", "opened", "followed")
_INTRANSITIVE = ("rested", "waited", "glowed", "creaked", "settled", "faded", "shone", "swayed")
_ADVERBS = ("slowly", "quietly", "for a while", "without a sound", "as usual", "once again",
            "all afternoon", "in the wind")
_TIMES = ("morning", "evening", "spring", "autumn", "winter", "afternoon", "summer", "night")
_TEMPLATES = (
    "The {adj} {noun} by {place} {intr} {adv}.",
    "{name} {verb} the {adj} {noun} near {place}.",
    "In the {time}, the {noun} {intr} {adv}.",
    "Everyone in the {noun2} knew that the {noun} was {adj}.",
    "{name} and {name2} walked from the {noun} to {place}.",
    "Nobody {verb} the {adj} {noun} that {time}.",
    "The {noun} looked {adj} after the {time} rain.",
    "A {adj} {noun} stood beside the {noun2}, and {name} {verb} it.",
)


def _synthetic_sentence(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    name, name2 = rng.sample(_NAMES, 2)
    noun, noun2 = rng.sample(_NOUNS, 2)
    sentence = template.format(
        adj=rng.choice(_ADJECTIVES), noun=noun, noun2=noun2, place=rng.choice(_PLACES),
        intr=rng.choice(_INTRANSITIVE), adv=rng.choice(_ADVERBS), name=name, name2=name2,
        verb=rng.choice(_PAST_VERBS), time=rng.choice(_TIMES),
    )
    sentence = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", sentence)
    return sentence[0].upper() + sentence[1:] + " "


# --------------------------------------------------------------------------------------------
# haystacks of a given length in tokens

_warned_fallback = False


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text``, without added special tokens where the tokenizer supports that."""
    try:
        return len(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a plain object whose encode() takes only the text
        return len(tokenizer.encode(text))


def resolve_haystack_kind(kind: str) -> str:
    """``"auto"`` becomes ``"austen"`` when the novels are here, else ``"synthetic"`` (warning
    once per process how to get the novels); other kinds are checked and returned."""
    global _warned_fallback
    if kind not in HAYSTACK_KINDS:
        raise ValueError(f"haystack kind must be one of {HAYSTACK_KINDS}, not {kind!r}")
    if kind != "auto":
        return kind
    if austen_available():
        return "austen"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"Jane Austen's novels are not in {austen_dir()}; the arena uses synthetic filler "
            f"text instead. To use real English text, {FETCH_HINT}.",
            DataFallbackWarning, stacklevel=3,
        )
    return "synthetic"


def _piece_stream(kind: str, seed: int):
    """Endless seeded stream of sentence pieces for a resolved haystack kind."""
    if kind == "repeat":
        i = 0
        while True:
            yield REPEAT_FILLER[i % len(REPEAT_FILLER)]
            i += 1
    rng = random.Random(f"haystack:{kind}:{seed}")
    if kind == "synthetic":
        while True:
            yield _synthetic_sentence(rng)
    sentences, paragraph_starts = _austen_sentences()
    i = rng.choice(paragraph_starts)  # a seeded place in the novels, at a paragraph start
    while True:
        yield sentences[i % len(sentences)]
        i += 1


def haystack_pieces(kind: str, n_tokens: int, tokenizer: Any, seed: int = 0) -> list[str]:
    """Filler text of ``n_tokens`` tokens (as close as a word allows, never more) as a list of
    pieces, each a sentence ending in its separator; ``"".join(pieces)`` is the text and the
    boundaries between pieces are where needles may go.

    ``kind``: ``"austen"`` (a seeded slice of the novels, from a paragraph start),
    ``"synthetic"`` (seeded varied sentences built in code), ``"repeat"`` (the fixed passkey
    filler; ``seed`` is ignored) or ``"auto"`` (Austen when present, else synthetic).
    The same arguments give the same pieces; a longer haystack of the same seed begins with a
    shorter one."""
    kind = resolve_haystack_kind(kind)
    if n_tokens <= 0:
        return []
    stream = _piece_stream(kind, seed)
    pieces: list[str] = []
    chars, want = 0, 8 * n_tokens + 64  # generous: no tokenizer in use averages 8 chars a token
    while True:
        while chars < want:
            pieces.append(next(stream))
            chars += len(pieces[-1])
        if count_tokens(tokenizer, "".join(pieces)) > n_tokens:
            break
        want *= 2
    # the most whole pieces that fit
    lo, hi = 0, len(pieces)  # count(pieces[:lo]) <= n_tokens < count(pieces[:hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(tokenizer, "".join(pieces[:mid])) <= n_tokens:
            lo = mid
        else:
            hi = mid
    head, partial = pieces[:lo], pieces[lo]
    # then the most words of the next piece
    prefix = "".join(head)
    words = partial.split()

    def cut(k: int) -> str:  # the first k words, closed with a full stop
        return " ".join(words[:k]).rstrip(",;:-\"'_(") + ". "

    lo_w, hi_w = 0, len(words)
    while hi_w - lo_w > 1:
        mid = (lo_w + hi_w) // 2
        if count_tokens(tokenizer, prefix + cut(mid)) <= n_tokens:
            lo_w = mid
        else:
            hi_w = mid
    if lo_w:
        head.append(cut(lo_w))
    return head


def haystack(kind: str, n_tokens: int, tokenizer: Any, seed: int = 0) -> str:
    """Filler text of about ``n_tokens`` tokens of ``tokenizer`` (any object with
    ``encode(text)``); see :func:`haystack_pieces` for the kinds."""
    return "".join(haystack_pieces(kind, n_tokens, tokenizer, seed)).strip()


def insert_pieces(pieces: Sequence[str], inserts: Sequence[tuple[float, str]]) -> tuple[str, list[int]]:
    """Insert texts into a haystack at fractional depths.

    Each ``(depth, text)`` goes to the piece boundary nearest to ``depth`` of the haystack's
    characters (0: before everything, 1: after everything); texts at one boundary keep their
    order. Returns the joined context and each insert's character offset in it."""
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    total = offsets[-1]
    slots: list[int] = []
    for depth, _ in inserts:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], not {depth}")
        target = depth * total
        slots.append(min(range(len(offsets)), key=lambda i: (abs(offsets[i] - target), i)))
    order = sorted(range(len(inserts)), key=lambda j: slots[j])  # stable: ties keep their order
    out: list[str] = []
    positions = [0] * len(inserts)
    cursor, length = 0, 0
    for j in order:
        chunk = "".join(pieces[cursor:slots[j]])
        if chunk:
            out.append(chunk)
            length += len(chunk)
        cursor = slots[j]
        if out and not out[-1].endswith((" ", "\n")):
            out.append(" ")
            length += 1
        text = inserts[j][1].strip()
        positions[j] = length
        out.append(text + " ")
        length += len(text) + 1
    out.append("".join(pieces[cursor:]))
    context = "".join(out)
    stripped = context.lstrip()
    shift = len(context) - len(stripped)
    return stripped.rstrip(), [p - shift for p in positions]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m longattn.arena.data [DEST]``: fetch the novels; exit 1 with the reason."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        dest = fetch_austen(args[0] if args else None)
    except DataNotAvailable as exc:
        print(f"longattn: {exc}", file=sys.stderr)
        return 1
    total = sum(p.stat().st_size for p in _novel_paths(dest))
    print(f"Jane Austen's novels: {len(NOVELS)} files, {total:,} bytes in {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
