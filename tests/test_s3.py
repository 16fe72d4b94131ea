"""Stores on object storage, against a real S3 server on loopback (moto's server: tests/s3server.py).

Extract into a bucket, probe from it, kill -9 mid-extraction and resume, a second writer refused, a bucket the
credentials may not write, missing credentials, the server stopped mid-run - each checked through the real `alf`
command or the Python API, the arrays compared with a local extraction of the same images."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_alf

if os.environ.get("ALF_REQUIRE_S3") == "1":  # CI: the object-storage tests must run, not skip
    import moto  # noqa: F401
    import s3fs  # noqa: F401
else:
    pytest.importorskip("moto", reason="the S3 server is moto's (extra s3test: make install)")
    pytest.importorskip("s3fs", reason="object storage needs the s3 extra (make install)")

from s3server import S3Server  # noqa: E402

ARRAYS = ("cls", "ap", "labels", "sample_ids")


@pytest.fixture(scope="module")
def server():
    with S3Server() as s3:
        yield s3


@pytest.fixture
def s3(server, monkeypatch):
    """The server's credentials and endpoint in the environment (inherited by `alf` subprocesses) and a fresh
    bucket; yields (server, 's3://bucket')."""
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ALF_S3_RETRIES", "2")
    return server, server.bucket(f"alf-{uuid.uuid4().hex[:10]}")


def extract_args(model: Path, out: str, *extra) -> list[str]:
    return ["extract", "--model", f"local-dir:{model}", "--dataset", "digits", "--out", out, "--workers", "0", *extra]


def store(root, split="train", model="tiny") -> str:
    return f"{root}/digits/local-{model}/{split}.zarr"


def arrays_of(path) -> dict:
    import zarr

    from alfcache.format import zarr_store

    g = zarr.open_group(zarr_store(path, read_only=True), mode="r")
    return {name: np.asarray(g[name][:]) for name in ARRAYS} | {"meta": dict(g.attrs)}


def assert_same_store(a, b) -> None:
    x, y = arrays_of(a), arrays_of(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    assert x["meta"]["complete"] and y["meta"]["complete"]
    assert x["meta"]["chunk_checksums"] == y["meta"]["chunk_checksums"]


@pytest.fixture(scope="module")
def local_small_chunks(tiny_model, tmp_path_factory):
    """The uninterrupted local extraction every S3 run is compared with (16-row chunks: many chunk writes)."""
    out = tmp_path_factory.mktemp("local")
    run_alf(*extract_args(tiny_model, str(out), "--chunk-rows", "16", "--batch-size", "16"), check=True)
    return out


def bare(bucket: str) -> str:
    return bucket.split("://", 1)[1]


def manifest_chunks(server: S3Server, bucket: str, key: str) -> int:
    try:
        body = server.client().get_object(Bucket=bare(bucket), Key=key)["Body"].read()
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    try:
        return len(json.loads(body)["done"])
    except ValueError:
        return 0


def start_extraction(model, out, env=None) -> subprocess.Popen:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"),
                             *extract_args(model, out, "--chunk-rows", "16", "--batch-size", "16")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)


def wait_for_chunks(server, bucket, key, n, proc, timeout=120) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = manifest_chunks(server, bucket, key)
        if got >= n:
            return got
        if proc.poll() is not None:
            pytest.fail(f"extraction ended before {n} chunks: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"fewer than {n} chunks after {timeout} s")


# ------------------------------------------------------------------------------------------ the main path
@pytest.mark.long
def test_extract_into_a_bucket_and_probe_from_it(s3, tiny_model, digits_stores, tmp_path):
    server, bucket = s3
    root = f"{bucket}/features"
    run_alf(*extract_args(tiny_model, root), check=True)
    local_root = Path(digits_stores["train"]).parents[2]
    for split in ("train", "test"):  # the same arrays and checksums as the local extraction
        assert_same_store(store(root, split), store(local_root, split))
    ls = run_alf("ls", root, check=True).stdout
    assert ls.count("yes") == 2 and f"{root}/digits/local-tiny/train.zarr" in ls
    assert "ok (" in run_alf("verify", store(root), check=True).stdout

    from probes.features import FeatureSet
    from probes.selection import TokenSpec

    remote, local = FeatureSet.open(store(root)), FeatureSet.open(digits_stores["train"])
    spec = TokenSpec()
    rows = np.random.default_rng(0).permutation(remote.rows)[:300]
    np.testing.assert_array_equal(remote.tokens(rows, spec), local.tokens(rows, spec))
    assert str(remote.path) == store(root)

    p = run_alf("probe", "--head", "linear", "--store-root", root, "--protocol", "quick", "--out", tmp_path / "r",
                check=True)
    q = run_alf("probe", "--head", "linear", "--store-root", local_root, "--protocol", "quick",
                "--out", tmp_path / "l", check=True)
    [a], [b] = (json.loads(f.read_text()) for f in (tmp_path / "r").rglob("linear.json")), \
        (json.loads(f.read_text()) for f in (tmp_path / "l").rglob("linear.json"))
    assert a["test_balanced_accuracy"] == b["test_balanced_accuracy"], (p.stdout, q.stdout)
    assert a["train_store"] == store(root)
    # the report reads the per-layer tokens from the bucket too
    rep = run_alf("report", "--store-root", root, "--results", tmp_path / "r", "--out", tmp_path / "rep",
                  "--protocol", "quick", "--no-modules", check=True)
    [layers_md] = (tmp_path / "rep" / "layers").rglob("*.md")
    assert "layer" in layers_md.read_text() and "report:" in rep.stdout


@pytest.mark.long
def test_cache_dir_reads_a_local_copy_once(s3, tiny_model, digits_stores, tmp_path):
    """--cache-dir: the first open copies the store (verified against its checksums), later opens read the copy
    without the server; a store re-extracted in the bucket is copied again."""
    server, bucket = s3
    root = f"{bucket}/f"
    run_alf(*extract_args(tiny_model, root), check=True)
    from alfcache.format import mirror_store, verify_store
    from probes.features import FeatureSet

    cache = tmp_path / "cache"
    first = mirror_store(store(root), cache)
    assert verify_store(first) > 0 and not list(first.glob("alf_progress*"))
    fs = FeatureSet.open(store(root), cache_dir=cache)
    assert str(fs.path) == store(root) and len(list(cache.iterdir())) == 1  # the same copy, not a second one
    server.stop()
    try:  # every epoch's reads come from the copy: no server needed
        np.testing.assert_array_equal(np.asarray(fs.cls[:]), np.asarray(arrays_of(digits_stores["train"])["cls"]))
    finally:
        server.start()
    run_alf(*extract_args(tiny_model, root, "--overwrite"), check=True)  # new created_at: a new copy
    assert mirror_store(store(root), cache) != first and len(list(cache.iterdir())) == 2


# ------------------------------------------------------------------------------------------ crash safety
@pytest.mark.long
def test_kill_9_mid_extraction_resumes_to_identical_arrays(s3, tiny_model, local_small_chunks):
    server, bucket = s3
    root = f"{bucket}/k"
    key = "k/digits/local-tiny/train.zarr/alf_progress.json"
    proc = start_extraction(tiny_model, root)
    got = wait_for_chunks(server, bucket, key, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = arrays_of(store(root))["meta"]
    assert not meta.get("complete") and got < 85, "killed before the end"
    # the killed writer's lock is still there: same host, dead pid -> taken over
    c = server.client()
    assert c.head_object(Bucket=bare(bucket), Key="k/digits/local-tiny/train.zarr.lock")
    first = c.head_object(Bucket=bare(bucket), Key="k/digits/local-tiny/train.zarr/cls/c/0/0/0")["LastModified"]
    time.sleep(1.1)  # LastModified has one-second resolution
    p = run_alf(*extract_args(tiny_model, root, "--chunk-rows", "16", "--batch-size", "16"), check=True)
    assert "removing stale lock" in p.stderr
    again = c.head_object(Bucket=bare(bucket), Key="k/digits/local-tiny/train.zarr/cls/c/0/0/0")["LastModified"]
    assert again == first, "a chunk recorded before the kill was written again: not a resume"
    for split in ("train", "test"):
        assert_same_store(store(root, split), store(local_small_chunks, split))
    keys = [o["Key"] for o in server.client().list_objects_v2(Bucket=bare(bucket), Prefix="k/")["Contents"]]
    assert not [k for k in keys if k.endswith(".lock") or "alf_progress" in k], keys


@pytest.mark.long
def test_server_stopped_mid_run_is_one_line_and_resume_works_later(s3, tiny_model, local_small_chunks):
    server, bucket = s3
    root = f"{bucket}/s"
    proc = start_extraction(tiny_model, root)
    wait_for_chunks(server, bucket, "s/digits/local-tiny/train.zarr/alf_progress.json", 5, proc)
    server.stop()
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        server.start()
    assert proc.returncode == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "unreachable" in lines[0] and "resume" in lines[0], err[-3000:]
    assert "Traceback" not in err
    run_alf(*extract_args(tiny_model, root, "--chunk-rows", "16", "--batch-size", "16"), check=True)
    for split in ("train", "test"):
        assert_same_store(store(root, split), store(local_small_chunks, split))


# ------------------------------------------------------------------------------------------ one writer
def test_a_second_writer_is_refused(s3, tiny_model):
    server, bucket = s3
    root = f"{bucket}/w"
    from alfcache.locks import store_lock

    with store_lock(store(root)):
        p = run_alf(*extract_args(tiny_model, root))
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "is being written by pid" in lines[0] and "--break-lock" in lines[0], p.stderr
    keys = [o["Key"] for o in server.client().list_objects_v2(Bucket=bare(bucket), Prefix="w/").get("Contents", [])]
    assert not [k for k in keys if "train.zarr/" in k], "the refused writer wrote nothing"


def test_put_if_absent_has_one_winner(s3):
    """Eight threads create the same lock object at once: the service's conditional write lets exactly one win."""
    from concurrent.futures import ThreadPoolExecutor

    from alfcache.remote import put_if_absent

    _, bucket = s3
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: put_if_absent(f"{bucket}/race.lock", str(i).encode()), range(8)))
    assert sum(won) == 1


def test_stale_lock_from_another_host_is_taken_over_and_the_old_writer_stops(s3, monkeypatch):
    """A lock not refreshed for ALF_LOCK_STALE_S is taken over (its holder died elsewhere); a fresh one from another
    host is refused; the writer whose lock was taken stops before recording its next chunk."""
    from alfcache.errors import AlfError
    from alfcache.locks import check_held, lock_path, store_lock
    from alfcache.format import location

    _, bucket = s3
    path = location(f"{bucket}/t/x/m/train.zarr")
    other = {"pid": 1, "host": "elsewhere", "since": "2026-01-01T00:00:00", "token": "theirs"}
    lock_path(path).write_bytes(json.dumps(other).encode())
    with pytest.raises(AlfError, match="being written by pid 1 on elsewhere"):
        with store_lock(path):
            pass
    time.sleep(1.5)
    monkeypatch.setenv("ALF_LOCK_STALE_S", "1")
    with store_lock(path):
        mine = json.loads(lock_path(path).read_bytes())
        assert mine["token"] != "theirs"
        check_held(path)  # ours
        lock_path(path).write_bytes(json.dumps(other).encode())  # someone took it over
        with pytest.raises(AlfError, match="lost the lock .* pid 1 on elsewhere"):
            check_held(path)
    assert json.loads(lock_path(path).read_bytes())["token"] == "theirs", "not ours to release"


# ------------------------------------------------------------------------------------------ access errors
def one_error_line(p) -> str:
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


def test_no_bucket_and_no_credentials_are_one_line(s3, tiny_model, tmp_path):
    server, bucket = s3
    line = one_error_line(run_alf(*extract_args(tiny_model, "s3://no-such-bucket-alf/x")))
    assert "bucket 'no-such-bucket-alf' does not exist" in line
    line = one_error_line(run_alf("probe", "--store-root", "s3://no-such-bucket-alf/x", "--out", tmp_path / "r"))
    assert "does not exist" in line
    nocreds = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "n"),
               "AWS_CONFIG_FILE": str(tmp_path / "n"), "AWS_PROFILE": ""}
    env = {k: v for k, v in os.environ.items() if k not in nocreds} | {k: v for k, v in nocreds.items() if v}
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *extract_args(tiny_model, f"{bucket}/x")],
                       capture_output=True, text=True, env=env | {"HF_HUB_OFFLINE": "1"}, cwd=ROOT, timeout=300)
    assert "no credentials" in one_error_line(p)


@pytest.mark.long
def test_a_bucket_the_credentials_may_not_write_is_refused(s3, tiny_model, digits_stores):
    """IAM enforced by the server: a user allowed to read the bucket only. Extraction is refused before any model
    loads; probing (reading) from it works."""
    from moto import settings

    server, bucket = s3
    root = f"{bucket}/ro"
    run_alf(*extract_args(tiny_model, root), check=True)
    iam = __import__("boto3").client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="reader")
    name = bucket.split("://")[1]
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadObject"],
             "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        line = one_error_line(run_alf(*extract_args(tiny_model, f"{bucket}/new"), env=env))
        assert "access denied" in line and f"{bucket}/new" in line
        p = run_alf("verify", store(root), env=env, check=True)
        assert "ok (" in p.stdout
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before


def test_a_writer_whose_lock_was_taken_records_no_further_chunk(s3, digits_stores):
    """Through the real sink: after another writer took the lock over, the next chunk is refused before its
    manifest entry, so the new writer redoes it (the old one never records a chunk it no longer owns)."""
    from alfcache.errors import AlfError
    from alfcache.format import chunk_ranges, open_arrays, read_metadata
    from alfcache.locks import lock_path, store_lock
    from alfcache.manifest import Manifest
    from alfcache.format import location
    from alfcache.sinks import open_sink

    _, bucket = s3
    src = read_metadata(digits_stores["train"])
    meta = {k: v for k, v in src.items() if k not in ("complete", "finished_at", "skipped", "chunk_checksums")}
    meta["chunk_rows"] = 16
    path = location(f"{bucket}/lost/digits/m/train.zarr")
    (k0, a0, b0), (k1, a1, b1) = list(chunk_ranges(meta))[:2]
    with open_arrays(digits_stores["train"]) as arr, store_lock(path):
        sink = open_sink(path, meta, overwrite=True)
        block = lambda a, b: ({n: np.asarray(arr[n][a:b]) for n in ("cls", "ap")}, np.asarray(arr["labels"][a:b]),  # noqa: E731
                              arr.ids(a, b), [])
        sink.write_chunk(k0, *block(a0, b0))
        lock_path(path).write_bytes(json.dumps({"pid": 1, "host": "elsewhere", "token": "theirs"}).encode())
        with pytest.raises(AlfError, match="lost the lock"):
            sink.write_chunk(k1, *block(a1, b1))
    assert set(Manifest(path).load().done) == {k0}
