"""Making an installation of server binaries reachable by the unprivileged service user.

Binaries in a folder that user cannot enter (a virtualenv under ``/root``, say) are linked or
copied, with what they load (``share/``, ``lib/`` and the folders their ELF ``RPATH`` /
``RUNPATH`` names relative to ``$ORIGIN``), into a folder of the harness, keeping their
relative layout so that every relative path still resolves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["relocate_install"]

_SHT_DYNAMIC = 6
_DT_NULL, _DT_RPATH, _DT_RUNPATH = 0, 15, 29
_ORIGINS = ("${ORIGIN}", "$ORIGIN")


def _section_headers(f: BinaryIO) -> list[tuple[int, ...]]:
    """The section headers of a 64-bit little-endian ELF file (empty for anything else)."""
    ident = f.read(64)
    if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        return []
    shoff = struct.unpack_from("<Q", ident, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", ident, 0x3A)
    if not shoff or shentsize < 64:
        return []
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    return [
        struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize)
        for i in range(len(table) // shentsize)
    ]


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _search_paths(f: BinaryIO) -> Iterator[str]:
    """Every entry of the file's ``DT_RPATH`` and ``DT_RUNPATH``."""
    sections = _section_headers(f)
    for _name, kind, _fl, _addr, offset, size, link, _info, _al, _es in sections:
        if kind != _SHT_DYNAMIC or link >= len(sections):
            continue
        dynamic = _read_at(f, offset, size)
        strings = _read_at(f, sections[link][4], sections[link][5])
        for i in range(0, len(dynamic) - 15, 16):
            tag, value = struct.unpack_from("<qQ", dynamic, i)
            if tag == _DT_NULL:
                break
            if tag in (_DT_RPATH, _DT_RUNPATH):
                text = strings[value : strings.index(b"\0", value)].decode(errors="replace")
                yield from text.split(":")


def _elf_origin_dirs(path: Path) -> set[Path]:
    """Existing folders named by ``$ORIGIN`` entries of an ELF file's RPATH / RUNPATH."""
    found: set[Path] = set()
    with contextlib.suppress(OSError, struct.error, ValueError), path.open("rb") as f:
        for entry in _search_paths(f):
            for origin in _ORIGINS:
                if entry.startswith(origin):
                    target = path.parent / ("." + entry[len(origin) :])
                    if target.is_dir():
                        found.add(Path(os.path.realpath(target)))
    return found


def _share_and_pkglib(bin_dir: Path) -> tuple[Path, Path]:
    """``pg_config --sharedir --pkglibdir`` when it answers, else the usual neighbours."""
    prefix = bin_dir.parent
    share, pkglib = prefix / "share", prefix / "lib"
    pg_config = bin_dir / "pg_config"
    if os.access(pg_config, os.X_OK):
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError):
            lines = subprocess.run(
                [str(pg_config), "--sharedir", "--pkglibdir"],
                capture_output=True,
                text=True,
                timeout=15,
                check=True,
            ).stdout.splitlines()
            share, pkglib = Path(lines[0].strip()), Path(lines[1].strip())
    return share, pkglib


def _install_dirs(bin_dir: Path) -> list[Path]:
    """Every folder the binaries of ``bin_dir`` need: bin, share, pkglib and ``$ORIGIN`` libs."""
    share, pkglib = _share_and_pkglib(bin_dir)
    folders = {Path(os.path.realpath(p)) for p in (bin_dir, share, pkglib) if p.is_dir()}
    for folder in (bin_dir, pkglib):
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    folders |= _elf_origin_dirs(entry)
    # Keep only the outermost folders (e.g. lib/ and not lib/pgxs/).
    outer = [f for f in folders if not any(o != f and o in f.parents for o in folders)]
    return sorted(outer)


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link ``src`` when it is readable by all, else copy it and make the copy so."""
    mode = os.stat(src).st_mode
    wanted = 0o004 | (0o001 if mode & 0o100 else 0)
    if mode & wanted == wanted:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    shutil.copy2(src, dst)
    os.chmod(dst, (mode & 0o7777) | 0o044 | (0o011 if mode & 0o100 else 0))
    return dst


def _open_folders(root: Path) -> None:
    """Mode 755 on ``root`` and every real folder below it."""
    for current, dirs, _files in os.walk(root):
        os.chmod(current, 0o755)
        for name in dirs:
            path = os.path.join(current, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)


def relocate_install(bin_dir: Path, dest: Path) -> Path:
    """Link/copy the installation of ``bin_dir`` under ``dest``; return the new bin folder."""
    folders = _install_dirs(bin_dir)
    real_bin = Path(os.path.realpath(bin_dir))
    base = Path(os.path.commonpath([str(f) for f in folders]))
    for folder in folders:
        shutil.copytree(
            folder, dest / folder.relative_to(base), symlinks=True, copy_function=_link_or_copy
        )
    _open_folders(dest)
    return dest / real_bin.relative_to(base)
