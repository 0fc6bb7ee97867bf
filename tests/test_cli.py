import subprocess
import sys

import pytest
from helpers import cli_in_process


@pytest.fixture
def cli(monkeypatch, capsys):
    """`streamtune ARGS` through app.cli.main in this process (test_debug_shows_traceback runs `python -m app`)."""
    return lambda *args: cli_in_process(monkeypatch, capsys, *args)


@pytest.mark.parametrize(
    "args, reason",
    [
        (["manifest", "/nonexistent/source", "--out", "/tmp/m.parquet"], "source not found"),
        (["shard", "/nonexistent/manifest.parquet", "--source", "/x", "--out", "/tmp/s"], "manifest.parquet"),
        (["run", "/nonexistent/config.yaml"], "config not found"),
        (["generate", "--prompt", "hi", "--adapter-path", "/nonexistent/adapter"], "no adapters.safetensors"),
    ],
)
def test_user_errors_are_one_line(args, reason, cli):
    result = cli(*args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert reason in lines[0] and "Traceback" not in result.stderr


def test_debug_shows_traceback():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "--debug",
            "manifest",
            "/nonexistent/source",
            "--out",
            "/tmp/m.parquet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_manifest_command_on_a_folder(tmp_path, cli):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello")
    out = tmp_path / "m.parquet"
    result = cli("manifest", str(tmp_path / "src"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert '"samples": 1' in result.stdout and out.exists()


def test_gc_deletes_only_old_unlisted_shards(tmp_path, cli):
    import json
    import os

    import pyarrow as pa

    from streamtune.shards import ShardSetWriter

    writer = ShardSetWriter(str(tmp_path / "set"), pa.schema([("x", pa.int64())]), max_shard_rows=2)
    writer.write(pa.table({"x": list(range(5))}))
    writer.close()
    listed = sorted(p.name for p in (tmp_path / "set").glob("shard-*.arrow"))
    stray, fresh = tmp_path / "set" / "shard-00099.arrow", tmp_path / "set" / "shard-00100.arrow"
    stray.write_bytes(b"replaced long ago")
    fresh.write_bytes(b"replaced a moment ago")
    os.utime(stray, (1_000_000_000, 1_000_000_000))
    result = cli("gc", str(tmp_path / "set"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["deleted"] == [str(stray)]
    assert not stray.exists() and fresh.exists()
    assert sorted(p.name for p in (tmp_path / "set").glob("shard-*.arrow")) == sorted([*listed, fresh.name])


def test_shard_reads_its_source_from_the_manifest(tmp_path, cli):
    import json

    from streamtune.shards import read_index

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"s{i}.txt").write_text(f"sample {i}")
    manifest = tmp_path / "m.parquet"
    assert cli("manifest", str(src), "--out", str(manifest)).returncode == 0
    result = cli("shard", str(manifest), "--out", str(tmp_path / "shards"), "--max-shard-bytes", "100000")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["source"] == str(src) and summary["rows"] == 3 and summary["quarantined"] == 0
    assert read_index(str(tmp_path / "shards"))["rows"] == 3
    # an explicit --source still wins (the bucket moved); a wrong one fails with one line
    moved = tmp_path / "moved"
    src.rename(moved)
    result = cli("shard", str(manifest), "--out", str(tmp_path / "s2"), "--source", str(moved))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["rows"] == 3
