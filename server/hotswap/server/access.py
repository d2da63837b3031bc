"""Which files and URLs a caller may make the server read.

A training dataset URI or an adapter source URI is the caller's choice but the
server's read: without a rule, any file the server's user can read could be
trained into an adapter and generated back. So local paths are read only under
configured folders (after symlinks are resolved: a link inside a folder that
points outside it is outside), and URLs only with a scheme an operator enabled.

A refusal says which rule the value broke and nothing about the file: not
whether it exists, is a folder, or what it holds.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import InvalidArgument, PermissionDenied

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB = re.compile(r"[*?\[\]{}]")


def split_list(value: str | list | tuple) -> list[str]:
    """An option holding several values: a TOML list, or one string separated by commas
    (schemes) or os.pathsep (folders), as PATH is."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v)]
    return [v for v in re.split(rf"[,{re.escape(os.pathsep)}]", value) if v]


@dataclass(frozen=True)
class SourcePolicy:
    roots: tuple[Path, ...]
    """Folders (resolved) under which local paths may be read."""
    schemes: frozenset[str]
    """URL schemes (lower case, e.g. "s3") the server may read from; file:// is a local path."""
    flag: str
    """The option that adds folders, named in refusals so an operator knows what to change."""

    @classmethod
    def of(cls, roots: list[str | Path], schemes: list[str], flag: str) -> "SourcePolicy":
        resolved = tuple(Path(os.path.realpath(os.path.expanduser(str(r)))) for r in roots)
        return cls(resolved, frozenset(s.lower().removesuffix("://") for s in schemes), flag)

    def check(self, uri: str, field: str) -> str:
        """The URI to read (a local path made absolute and free of links), or an error
        naming `field`: INVALID_ARGUMENT for a malformed value, PERMISSION_DENIED for one
        the rules do not allow."""
        if not uri:
            raise InvalidArgument("give a path or URL", field=field)
        if "\x00" in uri:
            raise InvalidArgument("contains a NUL character", field=field)
        if "::" in uri:
            # fsspec chains ("simplecache::s3://…") open other filesystems than the one named
            raise PermissionDenied("chained fsspec URLs (with '::') are not accepted", field=field)
        m = _SCHEME.match(uri)
        if m and m[1].lower() != "file":
            scheme = m[1].lower()
            if scheme not in self.schemes:
                enabled = ", ".join(sorted(self.schemes)) or "none"
                raise PermissionDenied(f"URL scheme {scheme[:20]!r} is not enabled on this server (enabled: {enabled}; "
                                       "an operator enables schemes with --allowed-uri-schemes)", field=field)
            if _GLOB.search(uri):
                raise InvalidArgument("name one file or folder; wildcards are not accepted", field=field)
            return uri
        path = uri[len("file://"):] if m else uri
        if not os.path.isabs(path):
            raise InvalidArgument("give an absolute path (or a URL)", field=field)
        if _GLOB.search(path):
            raise InvalidArgument("name one file or folder; wildcards are not accepted", field=field)
        real = Path(os.path.realpath(path))
        if not self._inside(real):
            raise PermissionDenied(f"the path is outside the folders this server reads from (an operator adds folders with {self.flag})",
                                   field=field)
        return str(real)

    def check_members(self, folder: str, names: Iterable[str], field: str) -> None:
        """For a folder `check` returned: refuse when a file the server will read in it (`names`) is a
        link leading outside the allowed folders. The folder being allowed says nothing about where
        its entries point; a link that stays inside (a Hugging Face cache snapshot's links to its
        blobs) is fine. URLs have no links to follow."""
        if _SCHEME.match(folder):
            return
        for name in names:
            if not self._inside(Path(os.path.realpath(os.path.join(folder, name)))):
                raise PermissionDenied(f"{name} in the folder links outside the folders this server reads from "
                                       f"(an operator adds folders with {self.flag})", field=field)

    def _inside(self, real: Path) -> bool:
        return any(real == root or real.is_relative_to(root) for root in self.roots)
