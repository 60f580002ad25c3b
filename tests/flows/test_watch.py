"""The watcher's bookkeeping without a server: content digests and mirroring an fsspec location."""
import os

from flows.watch import folder_digest, mirror


def test_folder_digest_follows_content_not_mtimes_or_hidden_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    before, files = folder_digest(tmp_path)
    assert [f.name for f in files] == ["a.jsonl"]
    os.utime(tmp_path / "a.jsonl", (1, 1))
    (tmp_path / ".a.jsonl.123.tmp").write_text("half a copy")
    (tmp_path / "notes.log").write_text("not a data format ETL reads")
    assert folder_digest(tmp_path)[0] == before
    (tmp_path / "more.csv").write_text("prompt,completion\np,c\n")  # every format ETL reads counts
    assert folder_digest(tmp_path)[0] != before
    (tmp_path / "more.csv").unlink()
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "d"}\n')
    assert folder_digest(tmp_path)[0] != before


def test_an_fsspec_location_is_mirrored_only_where_it_changed(tmp_path):
    remote, local = tmp_path / "bucket" / "new", tmp_path / "incoming"
    (remote / "sub").mkdir(parents=True)
    (remote / "a.jsonl").write_text("1\n")
    (remote / "sub" / "b.jsonl").write_text("2\n")
    (remote / ".hidden.jsonl").write_text("skip\n")
    uri = remote.as_uri()  # file://... goes through fsspec exactly as s3:// would
    assert sorted(p.relative_to(local).as_posix() for p in mirror(uri, local, tmp_path)) == ["a.jsonl", "sub/b.jsonl"]
    assert (local / "sub" / "b.jsonl").read_text() == "2\n" and not (local / ".hidden.jsonl").exists()
    assert mirror(uri, local, tmp_path) == []  # nothing changed, nothing copied
    (remote / "a.jsonl").write_text("1 changed\n")
    os.utime(remote / "a.jsonl", (10**9, 10**9))
    assert [p.name for p in mirror(uri, local, tmp_path)] == ["a.jsonl"] and (local / "a.jsonl").read_text() == "1 changed\n"
