"""The Python half of ``scripts/fetch_pretrained_teachers.sh``: safe archive extraction,
SHA-256 prefix checks and the ImageNet file list.

    python -m teacher_zoo.fetch extract-cifar TAR STAGING ARCH [ARCH ...]
    python -m teacher_zoo.fetch sha256 PATH
    python -m teacher_zoo.fetch imagenet-files [ARCH | ARCH=FILE ...] [--base URL]
    python -m teacher_zoo.fetch imagenet-files --deit [ARCH | ARCH=FILE ...] [--base URL]

``extract-cifar`` copies, for each ARCH, the one member
``cifar_teachers/<ARCH>_vanilla/ckpt_epoch_240.pth`` of mdistiller's ``cifar_teachers.tar`` to
``STAGING/cifar_teachers/<ARCH>_vanilla/ckpt_epoch_240.pth`` when it is a regular file; every
other member (links, devices, folders, other files, absolute names, ``..``) is left in the
archive. It exits 0 when the archive could be read (the script then checks each staged file),
3 when the file is not a tar archive. ``sha256`` exits 0 when the file's SHA-256 starts with
the hex digits its name carries (torchvision's ``<name>-<hex>.pth`` convention), 3 when not.
``imagenet-files`` prints one tab-separated line per requested ImageNet teacher:
``arch, file name, URL, registered`` (``yes`` when ``models.model_dict`` has the arch, so
that the script can run ``python -m teacher_zoo check`` on it); without arguments it
lists the paper's teachers of ``teacher_zoo.published.IMAGENET_TEACHERS``; with ``--deit``, the
DeiT table's mmcls files of ``DEIT_TEACHERS`` (under ``DEIT_URL``). ``ARCH=FILE`` fetches a
file the table does not name (another torchvision release, or, in tests, a file whose name
carries its own hash) into ``<ARCH>_imagenet/FILE``.

Only the standard library is imported at module level: the script calls ``extract-cifar``
and ``sha256`` without paying for torch.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tarfile
from typing import NamedTuple, Optional, Sequence

import models
from errors import UserError, exit_on_user_error
from helper.checkpoint import file_sha256, new_file_mode
from teacher_zoo.published import DEIT_TEACHERS, DEIT_URL, EXIT_INVALID, IMAGENET_TEACHERS, IMAGENET_URL

ARCHIVE_FOLDER = "cifar_teachers"
# torchvision's (and torch.hub's, and OpenMMLab's) convention: the hex digits between the last
# '-' and the extension are the start of the file's SHA-256.
_HASHED_NAME = re.compile(r"[A-Za-z0-9_.-]+-([0-9a-f]{8,64})\.[A-Za-z0-9]+")
_ARCH_NAME = re.compile(r"[A-Za-z0-9]+")


def archive_member(arch: str) -> str:
    """The member of mdistiller's ``cifar_teachers.tar`` that holds ``arch``'s teacher."""
    return f"{ARCHIVE_FOLDER}/{arch}_vanilla/ckpt_epoch_240.pth"


def _unsafe_reason(member: tarfile.TarInfo) -> Optional[str]:
    """Why a member must never be extracted anywhere, or None when only its name may be
    unexpected."""
    parts = member.name.split("/")
    if member.name.startswith("/") or re.match(r"[A-Za-z]:", member.name):
        return "absolute name"
    if ".." in parts:
        return "'..' in its name"
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r}"
    if not (member.isreg() or member.isdir()):
        return "device or special file"
    return None


def _members(tar: tarfile.TarFile, notes: list[str]) -> list[tarfile.TarInfo]:
    """The members listed before the end of the file: a download that broke off still yields
    the headers before the break (the members they describe may be cut short)."""
    members: list[tarfile.TarInfo] = []
    try:
        for member in tar:
            members.append(member)
    except tarfile.ReadError as err:
        if not members:
            raise
        notes.append(f"the archive ends after {len(members)} member(s) ({err}); truncated?")
    return members


def extract_teachers(tar_path: str, staging: str, archs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Extracts the allow-listed teacher members of ``tar_path`` below ``staging``.

    Only ``cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth`` for the requested ``archs`` is
    written, only when that member (its last occurrence, as ``tar x`` would leave it) is a
    regular file, and with tarfile's ``data`` filter where this Python has it. A member whose
    data ends early (a truncated archive) is removed again.

    Args:
        tar_path: the archive (plain tar, or compressed: the mode is detected).
        staging: an existing folder; files land in ``staging/cifar_teachers/...``.
        archs: architectures to extract.

    Returns:
        The archs written, and one line per member that was refused as unsafe or could not
        be read, for the user.

    Raises:
        tarfile.ReadError: ``tar_path`` is not a tar archive.
    """
    wanted = {archive_member(arch): arch for arch in archs}
    written, notes = [], []
    with tarfile.open(tar_path, "r:*") as tar:
        latest: dict[str, tarfile.TarInfo] = {}
        for member in _members(tar, notes):
            reason = _unsafe_reason(member)
            name = member.name[2:] if member.name.startswith("./") else member.name
            if reason and name not in wanted:
                notes.append(f"refused member {member.name!r}: {reason}")
            if name in wanted:
                latest[name] = member
        for name, member in latest.items():
            arch, reason = wanted[name], _unsafe_reason(member)
            if reason or not member.isreg():
                notes.append(f"refused member {member.name!r} for {arch}: {reason or 'not a file'}")
                continue
            member.name = name  # drop a leading './' so the file lands where the script looks
            target = os.path.join(staging, *name.split("/"))
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, staging, filter="data")
                else:  # Python < 3.8.17/3.9.17/3.10.12/3.11.4: the checks above stand in for it
                    tar.extract(member, staging)
                os.chmod(target, new_file_mode())
            except (tarfile.TarError, OSError, EOFError) as err:
                if os.path.lexists(target):
                    os.remove(target)
                notes.append(f"could not read member {name!r} for {arch} ({err}); the archive may be truncated")
                continue
            written.append(arch)
    return written, notes


def sha256_prefix(file_name: str) -> str:
    """The hex digits a torchvision file name carries: ``resnet34-b627a593.pth`` -> ``b627a593``.

    Raises:
        ValueError: the name does not follow the ``<name>-<8+ hex digits>.<ext>`` convention.
    """
    match = _HASHED_NAME.fullmatch(file_name)
    if not match:
        raise ValueError(f"{file_name!r} does not carry a SHA-256 prefix "
                         "(expected <name>-<8 or more hex digits>.pth, as torchvision names its files)")
    return match.group(1)


def _published_name(path: str) -> str:
    """The file name a download will have once complete (``x-1234abcd.pth.part`` -> ``x-1234abcd.pth``)."""
    name = os.path.basename(path)
    return name[: -len(".part")] if name.endswith(".part") else name


def sha256_matches(path: str, file_name: Optional[str] = None) -> bool:
    """Whether ``path``'s SHA-256 starts with the prefix carried by ``file_name`` (default:
    its own name; a ``.part`` suffix is ignored)."""
    return file_sha256(path).startswith(sha256_prefix(file_name or _published_name(path)))


class ImagenetFile(NamedTuple):
    """One ImageNet teacher file to fetch."""

    arch: str
    file: str
    url: str
    registered: bool


def _arch_ok(arch: str) -> bool:
    """Whether ``train_student.py`` reads ``arch`` back from the folder ``<arch>_imagenet``: a
    registered model (the longest registered prefix wins), or letters and digits only."""
    return bool(_ARCH_NAME.fullmatch(arch)) or arch in models.model_dict


def resolve_imagenet(specs: Sequence[str], base: Optional[str] = None,
                     deit: bool = False) -> list[ImagenetFile]:
    """Turns the script's ``--imagenet`` (or ``--deit``) arguments into files to fetch.

    Args:
        specs: ``ARCH`` (a row of ``IMAGENET_TEACHERS``, or of ``DEIT_TEACHERS`` with ``deit``)
            or ``ARCH=FILE``; empty: the table's teachers (rows marked ``teacher``).
        base: URL the files are under (default: the table's: torchvision's server, or
            OpenMMLab's for ``deit``).
        deit: use the DeiT table (mmcls's DeiT III-S) instead of torchvision's.

    Raises:
        UserError: unknown ARCH without a file, a FILE without a SHA-256 prefix, or an ARCH
            that ``train_student.py`` could not read back from ``<ARCH>_imagenet``.
    """
    table, kind = (DEIT_TEACHERS, "DeiT") if deit else (IMAGENET_TEACHERS, "ImageNet")
    base = (base or (DEIT_URL if deit else IMAGENET_URL)).rstrip("/") + "/"
    specs = list(specs) or [arch for arch, row in table.items() if row.teacher]
    files = []
    for spec in specs:
        arch, sep, file = spec.partition("=")
        if not _arch_ok(arch):
            raise UserError(f"{kind} teacher name {arch!r} must be letters and digits only, or a "
                            "registered model (train_student.py reads it back from the folder "
                            "<arch>_imagenet)")
        if not sep:
            if arch not in table:
                raise UserError(f"unknown {kind} teacher {arch!r}; choose from "
                                f"{', '.join(table)} or give ARCH=FILE")
            file = table[arch].file
        if "/" in file or not file:
            raise UserError(f"{spec!r}: FILE must be a bare file name under the base URL")
        try:
            sha256_prefix(file)
        except ValueError as err:
            raise UserError(str(err)) from None
        files.append(ImagenetFile(arch, file, base + file, arch in models.model_dict))
    return files


def _cmd_extract(args: argparse.Namespace) -> int:
    try:
        written, notes = extract_teachers(args.tar, args.staging, args.archs)
    except (tarfile.TarError, OSError, EOFError) as err:
        print(f"invalid: {args.tar} is not a readable tar archive ({err})", file=sys.stderr)
        return EXIT_INVALID
    for note in notes:
        print(f"archive: {note}", file=sys.stderr)
    for arch in written:
        print(arch)
    return 0


def _cmd_sha256(args: argparse.Namespace) -> int:
    try:
        ok = sha256_matches(args.path, args.name)
    except ValueError as err:
        raise UserError(str(err)) from None
    except OSError as err:
        print(f"invalid: cannot read {args.path} ({err.strerror})", file=sys.stderr)
        return EXIT_INVALID
    if not ok:
        print(f"invalid: the SHA-256 of {args.path} does not start with "
              f"{sha256_prefix(args.name or _published_name(args.path))}",
              file=sys.stderr)
        return EXIT_INVALID
    return 0


def _cmd_imagenet_files(args: argparse.Namespace) -> int:
    for row in resolve_imagenet(args.specs, args.base, args.deit):
        print("\t".join((row.arch, row.file, row.url, "yes" if row.registered else "no")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m teacher_zoo.fetch",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    extract = sub.add_parser("extract-cifar", help="extract the teachers of cifar_teachers.tar safely")
    extract.add_argument("tar")
    extract.add_argument("staging", help="existing folder that receives cifar_teachers/<arch>_vanilla/...")
    extract.add_argument("archs", nargs="+")
    sha = sub.add_parser("sha256", help="does PATH's SHA-256 start with the prefix its name carries?")
    sha.add_argument("path")
    sha.add_argument("--name", default=None, help="take the prefix from this file name instead")
    files = sub.add_parser("imagenet-files", help="arch, file, URL, registered of ImageNet teachers")
    files.add_argument("specs", nargs="*", metavar="ARCH[=FILE]")
    files.add_argument("--base", default=None, help="base URL holding the files (a mirror)")
    files.add_argument("--deit", action="store_true",
                       help="the DeiT table (mmcls's DeiT III-S) instead of torchvision's files")
    return parser


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return {"extract-cifar": _cmd_extract, "sha256": _cmd_sha256,
            "imagenet-files": _cmd_imagenet_files}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
