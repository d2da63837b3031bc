"""The rule for what callers may make the server read (hotswap.server.access)."""
from __future__ import annotations

import pytest

from hotswap.server.access import SourcePolicy, split_list
from hotswap.server.errors import InvalidArgument, PermissionDenied
from hotswap.server.options import parse_options


def test_paths_are_judged_after_normalising_and_resolving_links(tmp_path):
    root, sibling = tmp_path / "data", tmp_path / "data-evil"
    (root / "sub").mkdir(parents=True)
    sibling.mkdir()
    (root / "escape").symlink_to(sibling)
    policy = SourcePolicy.of([root], ["S3"], "--allowed-data-dir")
    assert policy.check(str(root / "sub" / "x.jsonl"), "f") == str((root / "sub" / "x.jsonl").resolve())
    assert policy.check((root / "x.jsonl").as_uri(), "f") == str(root / "x.jsonl")
    assert policy.check(str(root), "f") == str(root)
    assert policy.check("s3://bucket/x.jsonl", "f") == "s3://bucket/x.jsonl"  # schemes are case-insensitive
    for outside in (str(sibling / "x.jsonl"), str(root / ".." / "data-evil" / "x.jsonl"), str(root / "escape" / "x.jsonl"),
                    "gs://bucket/x", "file::s3://bucket/x", "HTTP://example.com/x.jsonl"):
        with pytest.raises(PermissionDenied) as e:
            policy.check(outside, "train.uri")
        assert e.value.field == "train.uri" and str(tmp_path) not in str(e.value)
    for bad in ("", "x.jsonl", "./x.jsonl", str(root / "*.jsonl"), "s3://bucket/*.jsonl", str(root) + "/a\x00b"):
        with pytest.raises(InvalidArgument):
            policy.check(bad, "train.uri")


def test_options_name_folders_like_path_and_schemes_with_commas(tmp_path):
    assert split_list("/a:/b") == ["/a", "/b"] and split_list("s3,gs") == ["s3", "gs"] and split_list(["/a", ""]) == ["/a"]
    opts = parse_options(["--data-dir", str(tmp_path), "--allowed-data-dir", "/srv/data:/mnt/x", "--allowed-uri-schemes", "s3"], {})
    assert opts.data_policy().roots[0] == (tmp_path / "uploads").resolve()  # its own uploads are always readable
    assert opts.data_policy().schemes == {"s3"}
    assert opts.adapter_policy().roots == ((tmp_path / "imports").resolve(),)
