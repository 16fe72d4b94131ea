"""The object-storage rules of the store contract that need no server: which locations are remote, what they become,
the filesystem options, the one-line explanations of client errors, and the read-ahead helper. (The behaviour
against a real S3 server is tests/test_s3.py.)"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from alfcache import format as F

from conftest import add_projection

botocore = pytest.importorskip("botocore")
pytest.importorskip("upath")


@pytest.mark.parametrize("where, remote", [
    ("s3://bucket/x", True), ("S3://bucket/x", True), ("gs://b/x", True), ("az://c/x", True),
    ("s3a://b/x", True), ("features", False), ("/abs/features", False), ("./s3://not-a-url", False),
    ("file:///tmp/x", False), ("s3:/bucket/x", False), ("3s://b/x", False), ("", False)])
def test_is_remote(where, remote):
    assert F.is_remote(where) is remote
    assert F.is_remote(Path(where)) is False  # a Path is local whatever it is called


def test_location_local_and_remote():
    assert F.location("features/a") == Path("features/a") and isinstance(F.location("x"), Path)
    p = Path("/tmp/x")
    assert F.location(p) is p
    assert F.location("file:///tmp/x/y.zarr") == Path("/tmp/x/y.zarr")
    u = F.location("s3://bucket/root")
    assert str(u) == "s3://bucket/root" and F.is_remote(u) and F.location(u) is u
    s = u / "digits" / "m" / "train.zarr"
    assert str(s) == "s3://bucket/root/digits/m/train.zarr" and s.name == "train.zarr" and s.suffix == ".zarr"
    assert F.is_remote(s) and str(s.parent) == "s3://bucket/root/digits/m"
    opts = u.storage_options
    assert opts["use_listings_cache"] is False
    assert opts["config_kwargs"]["retries"] == {"max_attempts": 8, "mode": "standard"}
    with pytest.raises(F.StoreError, match="nosuchproto"):
        F.location("nosuchproto://b/x")


def test_store_paths_on_object_storage():
    assert str(F.store_path("s3://b/root", "fer 2013", "clip/l", "train")) == "s3://b/root/fer-2013/clip-l/train.zarr"
    with pytest.raises(F.StoreError, match="HDF5 stores live on local disks only"):
        F.store_path("s3://b/root", "d", "m", "train", "h5")
    with pytest.raises(F.StoreError, match="HDF5 stores live on local disks only"):
        F.store_format("s3://b/root/d/m/train.h5")
    assert F.store_format("s3://b/root/d/m/train.zarr") == "zarr" and F.store_format("/x/train.h5") == "h5"


def test_storage_options(monkeypatch):
    assert F.storage_options("gs") == {} and F.storage_options("file") == {}
    monkeypatch.setenv("ALF_S3_RETRIES", "3")
    for proto in ("s3", "s3a"):
        o = F.storage_options(proto)
        assert o["config_kwargs"]["retries"]["max_attempts"] == 3 and o["use_listings_cache"] is False
        assert o["config_kwargs"]["connect_timeout"] == 5 and o["config_kwargs"]["read_timeout"] == 60


def test_zarr_store_is_a_folder_name_locally_and_an_fsspec_store_remotely():
    assert F.zarr_store(Path("/tmp/a.zarr"), read_only=True) == "/tmp/a.zarr"
    st = F.zarr_store("s3://bucket/a.zarr", read_only=True)
    assert type(st).__name__ == "FsspecStore" and st.read_only and st.path == "bucket/a.zarr"
    assert not F.zarr_store("s3://bucket/a.zarr", read_only=False).read_only


def client_error(code: str, message: str, op: str = "PutObject", **extra):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message, **extra}}, op)


def client_error_raw(response: dict, op: str = "HeadObject"):
    from botocore.exceptions import ClientError

    return ClientError(response, op)


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as c:
            raise outer from c
    except BaseException as e:
        return e


def test_explain_names_each_object_storage_failure(monkeypatch):
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("ALF_S3_RETRIES", "4")
    assert F.explain(NoCredentialsError()).startswith("object storage: no credentials found (set AWS_ACCESS_KEY_ID")
    assert "no credentials" in F.explain(PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"))
    # s3fs turns the service's answer into a builtin error raised from botocore's
    nb = raised_from(FileNotFoundError("The specified bucket does not exist"),
                     client_error("NoSuchBucket", "The specified bucket does not exist", BucketName="lab-x"))
    assert F.explain(nb, path="s3://lab-x/p") == ("object storage: the bucket 'lab-x' does not exist (create it, or "
                                                  "check the URL and http://127.0.0.1:9)")
    assert "bucket 'from-path' does not exist" in F.explain(FileNotFoundError("The specified bucket does not exist"),
                                                            path="s3://from-path/k")
    down = F.explain(EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b"))
    assert down == ("object storage unreachable at http://127.0.0.1:9 (gave up after 4 attempts with back-off); "
                    "everything written before is kept - rerun the same command to resume")
    denied = raised_from(PermissionError(13, "Access Denied", "lab/x/zarr.json"), client_error("AccessDenied", "Access Denied"))
    assert F.explain(denied) == ("object storage: access denied 'lab/x/zarr.json' (the credentials may not read or "
                                 "write there; check the bucket policy or use a bucket you may write)")
    assert F.explain(client_error("AccessDenied", "Access Denied")).startswith("object storage: access denied (")
    assert "were refused" in F.explain(client_error("InvalidAccessKeyId", "no such key"))
    assert F.explain(ValueError("something else")) is None
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:1")
    assert "unreachable at http://s3-only:1" in F.explain(EndpointConnectionError(endpoint_url="x"))


def test_explain_from_an_unknown_place_needs_an_object_storage_library():
    """`alf`'s last resort sees every uncaught error: a local PermissionError or a missing file is not an object
    storage problem unless an object-storage client raised it."""
    local = PermissionError(13, "Permission denied", "/data/x")
    assert F.explain(local, remote=False) is None
    assert F.explain(FileNotFoundError("bucket does not exist"), remote=False) is None
    assert F.explain(local) is not None  # a caller that knows the path is remote
    via = raised_from(PermissionError(13, "Access Denied"), client_error("AccessDenied", "Access Denied"))
    assert F.explain(via, remote=False).startswith("object storage: access denied")


def test_access_error_raises_only_for_remote_paths():
    from botocore.exceptions import NoCredentialsError

    F.access_error("/local/store.zarr", NoCredentialsError())  # local: nothing to say, returns
    F.access_error("s3://b/x.zarr", ValueError("not an access problem"))
    with pytest.raises(F.StoreError, match=r"no credentials found .*\[s3://b/x.zarr\]$"):
        F.access_error("s3://b/x.zarr", NoCredentialsError())
    # the store's URL names the bucket where the service's answer does not
    with pytest.raises(F.StoreError) as e:
        F.access_error("s3://lab-z/f/x.zarr", FileNotFoundError("The specified bucket does not exist"))
    assert str(e.value) == ("object storage: the bucket 'lab-z' does not exist (create it, or check the URL and "
                            f"{os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL') or 'the S3 endpoint'}) "
                            "[s3://lab-z/f/x.zarr]")


def test_read_ahead_setting(monkeypatch):
    monkeypatch.delenv("ALF_READ_AHEAD", raising=False)
    assert F.read_ahead("/x/train.zarr") == 1 and F.read_ahead("s3://b/train.zarr") == 8
    monkeypatch.setenv("ALF_READ_AHEAD", "3")
    assert F.read_ahead("s3://b/train.zarr") == 3 and F.read_ahead(Path("s3://b")) == 1


@pytest.mark.parametrize("ahead", [0, 1, 2, 5, 50])
def test_prefetched_keeps_order_and_bounds_requests_in_flight(ahead):
    lock, now, most, calls = threading.Lock(), [0], [0], []

    def slow(i):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            calls.append(i)
        time.sleep(0.01 * ((i * 7) % 3))  # finish out of order
        with lock:
            now[0] -= 1
        return i * i

    out = []
    for v in F.prefetched(slow, range(12), ahead):
        out.append(v)
    assert out == [i * i for i in range(12)] and sorted(calls) == list(range(12))
    assert most[0] <= max(1, ahead)
    if ahead >= 2:
        assert most[0] >= 2, "several requests were in flight"


def test_prefetched_passes_errors_through_in_order():
    def f(i):
        if i == 3:
            raise KeyError("chunk 3")
        return i

    got = []
    with pytest.raises(KeyError, match="chunk 3"):
        for v in F.prefetched(f, range(6), 4):
            got.append(v)
    assert got == [0, 1, 2]
    assert list(F.prefetched(f, [], 4)) == [] and list(F.prefetched(f, [5], 4)) == [5]


# ------------------------------------------------------------------------------------------ remote layouts
# Listing, sizing and the read-through copy work through fsspec's filesystem interface only (ls, du, get), so
# they are tested here on fsspec's in-memory filesystem (memory://: a real fsspec filesystem, remote to
# `is_remote`); tests/test_s3.py runs the same code against a real S3 server.
@pytest.fixture
def bucket(tmp_path):
    """A fresh memory:// 'bucket' (the in-memory filesystem is process-wide: a name of its own per test)."""
    name = f"bkt-{tmp_path.name.lower().replace('_', '-')}"
    fs = F.location(f"memory://{name}").fs
    yield name, fs
    fs.rm(f"/{name}", recursive=True) if fs.exists(f"/{name}") else None


def small_store(folder: Path, **meta) -> Path:
    """A real zarr store (metadata + two arrays of a few chunks) on local disk."""
    import numpy as np
    import zarr

    g = zarr.open_group(str(folder), mode="w", zarr_format=3)
    g.attrs.put({"format": F.FORMAT, "format_version": F.VERSION, "complete": True, "created_at": "t0",
                 "chunk_checksums": ["a", "b"], **meta})
    g.create_array("cls", data=np.arange(40, dtype=np.float32).reshape(20, 2), chunks=(8, 2))
    g.create_array("labels", data=np.arange(20) % 3, chunks=(8,))
    return folder


def tree(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_remote_listing_through_fsspecs_local_filesystem(tmp_path):
    """The same listing through fsspec's local filesystem (its `ls` lists names unless asked for details, and
    lists files and folders in the directory's own order): the stores only, in the order of their names - the
    order find_stores gives for a local folder."""
    import fsspec

    for key in ["a/x.zarr/zarr.json", "a-b/x.zarr/zarr.json", "a/f1", "a/f2.zarr", "a/z.zarr/zarr.json",
                "a/y/w.zarr/zarr.json", "0.txt", "a-b/k/f"]:
        (tmp_path / "r" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "r" / key).write_text("{}")
    fs = fsspec.filesystem("file")
    rel = F._store_names(fs, str(tmp_path / "r"))
    assert rel == ["a-b/x.zarr", "a/x.zarr", "a/y/w.zarr", "a/z.zarr"]
    assert F._store_names(fs, str(tmp_path / "r") + "/", max_depth=1) == ["a-b/x.zarr", "a/x.zarr", "a/z.zarr"]
    assert F._store_names(fs, str(tmp_path / "nothing")) == []
    assert [str(p.relative_to(tmp_path / "r")) for p in F.find_stores(tmp_path / "r")] == rel


def test_remote_listing_finds_stores_without_entering_them(bucket):
    """Every *.zarr folder under the root, at any depth up to 6 folders below it, sorted; a store inside a store,
    a file named like a store and folders deeper than 6 are not stores of the root; a missing root has none."""
    name, fs = bucket
    for key in ["d/m/train.zarr/zarr.json", "d/m/test.zarr/zarr.json", "top.zarr/zarr.json",
                "top.zarr/inner.zarr/zarr.json", "d/m/notes.zarr", "d/other/readme.txt",
                "1/2/3/4/5/6/deep.zarr/zarr.json", "1/2/3/4/5/6/7/deeper.zarr/zarr.json"]:
        fs.pipe(f"/{name}/r/{key}", b"{}")
    root = F.location(f"memory://{name}/r")
    found = F.find_stores(f"memory://{name}/r")
    assert found == [root / k for k in ["1/2/3/4/5/6/deep.zarr", "d/m/test.zarr", "d/m/train.zarr", "top.zarr"]]
    assert all(F.is_remote(p) for p in found)
    assert F.find_stores(f"memory://{name}/r/d/") == [root / "d/m/test.zarr", root / "d/m/train.zarr"]
    assert F._find_remote_stores(f"memory://{name}/r", max_depth=1) == [root / "top.zarr"]
    assert F.find_stores(f"memory://{name}/nothing-here") == []


def test_size_of_counts_every_byte(bucket, tmp_path):
    name, fs = bucket
    fs.pipe(f"/{name}/s.zarr/zarr.json", b"x" * 7)
    fs.pipe(f"/{name}/s.zarr/cls/c/0/0", b"y" * 1000)
    fs.pipe(f"/{name}/other.zarr/zarr.json", b"z" * 50)  # beside it: not counted
    assert F.size_of(f"memory://{name}/s.zarr") == 1007
    (tmp_path / "f" / "g").mkdir(parents=True)
    (tmp_path / "f" / "a").write_bytes(b"1" * 3)
    (tmp_path / "f" / "g" / "b").write_bytes(b"2" * 11)
    assert F.size_of(tmp_path / "f") == 14 and F.size_of(str(tmp_path / "f" / "g" / "b")) == 11


def test_read_through_copy_is_whole_named_by_identity_and_reused(bucket, tmp_path):
    """mirror_store: the remote store's objects copied byte for byte (the writer's progress files left out) under
    `<sha256 of [url, created_at, chunk_checksums]>[:16]-<name>`, reused while the store is unchanged (no request
    made), fetched anew when it was re-extracted; a half copy of a killed fetch is never used; local stores are
    returned as they are and incomplete remote ones are refused."""
    import hashlib
    import json

    name, fs = bucket
    local = small_store(tmp_path / "src" / "train.zarr")
    url = f"memory://{name}/f/d/m/train.zarr"
    fs.put(str(local), f"/{name}/f/d/m/train.zarr", recursive=True)
    fs.pipe(f"/{name}/f/d/m/train.zarr/alf_progress.json", b"{}")
    fs.pipe(f"/{name}/f/d/m/train.zarr/alf_progress-7.json", b"{}")
    cache = tmp_path / "not" / "yet" / "cache"  # made as needed, parents included
    ident = json.dumps([str(F.location(url)), "t0", ["a", "b"]])
    want = cache / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}-train.zarr"
    (cache / (want.name + ".partial999999")).mkdir(parents=True)  # another process's: not ours, left alone
    mine = cache / (want.name + f".partial{__import__('os').getpid()}")
    mine.mkdir(parents=True)
    (mine / "junk.bin").write_bytes(b"half")  # a killed fetch of this process id: replaced
    got = F.mirror_store(url, cache)
    assert got == want
    assert tree(got) == tree(local) and "alf_progress.json" not in tree(got)
    assert not mine.exists() and sorted(p.name for p in cache.iterdir()) == sorted([want.name, want.name + ".partial999999"])
    assert F.read_metadata(got)["chunk_checksums"] == ["a", "b"]
    first = tree(got)
    # unchanged: the copy is reused without reading the bucket
    fs.rm(f"/{name}/f", recursive=True)
    assert F.mirror_store(url, cache, meta=F.read_metadata(got)) == want and tree(want) == first
    # re-extracted (new checksums): a new copy under a new name
    small_store(local, chunk_checksums=["c", "d"])
    fs.put(str(local), f"/{name}/f/d/m/train.zarr", recursive=True)
    again = F.mirror_store(url, cache)
    assert tree(want) == first, "the old copy is left as it was"
    assert again != want and again.name.endswith("-train.zarr") and tree(again) == tree(local)
    assert F.read_metadata(again)["chunk_checksums"] == ["c", "d"]
    # a copy without its zarr.json (a torn copy by hand) is not taken for a copy
    (again / "zarr.json").unlink()
    assert F.mirror_store(url, cache) == again and (again / "zarr.json").is_file()
    assert F.mirror_store(local, cache) == local
    small_store(local, complete=False)
    fs.rm(f"/{name}/f", recursive=True)
    fs.put(str(local), f"/{name}/f/d/m/train.zarr", recursive=True)
    with pytest.raises(F.StoreError) as e:
        F.mirror_store(url, cache)
    assert str(e.value) == f"store '{url}' is incomplete (extraction did not finish); it is not cached"


# ------------------------------------------------------------------------------------------ explain, case by case
UNREACHABLE = ("object storage unreachable at {endpoint} (gave up after {attempts} attempts with back-off); "
               "everything written before is kept - rerun the same command to resume")
NO_CREDENTIALS = ("object storage: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                  "AWS_PROFILE / ~/.aws/credentials, or run where an instance role applies)")
DENIED = ("object storage: access denied{where} (the credentials may not read or write there; check the bucket "
          "policy or use a bucket you may write)")
REFUSED = "object storage: the credentials were refused (InvalidAccessKeyId / SignatureDoesNotMatch)"


def failures():
    """(what, the exception as its library raises it, the whole line explain must give) - each kind of failure of
    each client library the object-storage stack uses, without the endpoint or retry settings in the environment."""
    import aiohttp
    import fsspec.exceptions
    from aiohttp.client_reqrep import ConnectionKey
    from botocore import exceptions as bx

    key = ConnectionKey("127.0.0.1", 9, False, True, None, None, None, None)
    down = UNREACHABLE.format(endpoint="the S3 endpoint", attempts=8)
    return [
        ("no credentials", bx.NoCredentialsError(), NO_CREDENTIALS),
        ("partial credentials", bx.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
         NO_CREDENTIALS),
        ("credentials not retrieved", bx.CredentialRetrievalError(provider="sso", error_msg="expired"), NO_CREDENTIALS),
        ("no bucket, named by the service", client_error("NoSuchBucket", "gone", BucketName="lab-y"),
         "object storage: the bucket 'lab-y' does not exist (create it, or check the URL and the S3 endpoint)"),
        ("no bucket, unnamed", client_error("NoSuchBucket", "gone"),
         "object storage: the bucket does not exist (create it, or check the URL and the S3 endpoint)"),
        ("no bucket, an answer without its error", raised_from(FileNotFoundError("The bucket does not exist"),
                                                              client_error_raw({"ResponseMetadata": {}})),
         "object storage: the bucket does not exist (create it, or check the URL and the S3 endpoint)"),
        ("no bucket, in other words", FileNotFoundError("The specified Bucket does not exist"),
         "object storage: the bucket does not exist (create it, or check the URL and the S3 endpoint)"),
        ("endpoint down", bx.EndpointConnectionError(endpoint_url="http://x:1"), down),
        ("connect timeout", bx.ConnectTimeoutError(endpoint_url="http://x:1"), down),
        ("read timeout", bx.ReadTimeoutError(endpoint_url="http://x:1"), down),
        ("connection closed", bx.ConnectionClosedError(endpoint_url="http://x:1"), down),
        ("aiohttp cannot connect", aiohttp.ClientConnectorError(key, OSError(111, "Connection refused")), down),
        ("aiohttp server gone", aiohttp.ServerDisconnectedError(), down),
        ("fsspec timeout", fsspec.exceptions.FSTimeoutError(), down),
        ("refused connection", ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)"), down),
        ("a reset is not 'unreachable'", ConnectionResetError(104, "reset by peer"), None),
        ("'Connect' in a message is not a failed connection", ValueError("Connect the dots"), None),
        ("denied, file named", PermissionError(13, "Access Denied", "b/k/zarr.json"), DENIED.format(where=" 'b/k/zarr.json'")),
        ("denied by code", client_error("AccessDenied", "Access Denied"), DENIED.format(where="")),
        ("forbidden", client_error("403", "Forbidden", "HeadObject"), DENIED.format(where="")),
        ("bad key id", client_error("InvalidAccessKeyId", "no such key"), REFUSED),
        ("bad signature", client_error("SignatureDoesNotMatch", "wrong secret"), REFUSED),
        ("anything else", KeyError("x"), None),
    ]


@pytest.mark.parametrize("i", range(23))
def test_explain_each_failure_in_its_own_words(i, monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "ALF_S3_RETRIES"):
        monkeypatch.delenv(var, raising=False)
    cases = failures()
    assert len(cases) == 23
    what, exc, line = cases[i]
    assert F.explain(exc) == line, what
    # the same failure re-raised by a wrapper (s3fs and zarr raise their own errors from the client's) reads the same
    assert F.explain(raised_from(OSError("wrapped"), exc)) == line, what


def test_explain_names_the_bucket_from_the_answer_before_the_url():
    """The bucket the service names wins over the URL's (a URL may point at one bucket and an alias at another);
    the URL's first component is the bucket, whatever the key holds; a local path names none."""
    answer = client_error("NoSuchBucket", "gone", BucketName="from-answer")
    assert "bucket 'from-answer' does not exist" in F.explain(answer, path="s3://from-url/k")
    plain = client_error("NoSuchBucket", "gone")
    assert "bucket 'from-url' does not exist" in F.explain(plain, path="s3://from-url/odd://key/x")
    assert "the bucket does not exist" in F.explain(plain, path="/local/features")
    assert "the bucket does not exist" in F.explain(plain, path=None)


def remote_copy_of(fs, name: str, local: Path) -> str:
    fs.put(str(local), f"/{name}/f/train.zarr", recursive=True)
    return f"memory://{name}/f/train.zarr"


def test_read_through_copy_failures_leave_no_copy(bucket, tmp_path, monkeypatch):
    """A fetch that fails (the client's error, a local write error, the store gone meanwhile) leaves neither a
    copy nor a half copy, and says what happened in one line where it is an access problem."""
    from botocore.exceptions import NoCredentialsError

    name, fs = bucket
    url = remote_copy_of(fs, name, small_store(tmp_path / "src" / "train.zarr"))
    cache = tmp_path / "cache"
    meta = F.read_metadata(url)

    def no_credentials(*a, **k):
        raise NoCredentialsError()

    with monkeypatch.context() as m:
        m.setattr(type(fs), "get", no_credentials)
        with pytest.raises(F.StoreError) as e:
            F.mirror_store(url, cache)
    assert str(e.value) == f"{NO_CREDENTIALS} [{url}]"
    assert list(cache.iterdir()) == []
    # a local write error (an object name too long for a local file): raised as it is, nothing kept
    fs.pipe(f"/{name}/f/train.zarr/{'x' * 300}", b"an object no local disk can hold under its name")
    with pytest.raises(OSError):
        F.mirror_store(url, cache, meta)
    assert list(cache.iterdir()) == []
    # the store being deleted from the bucket after its metadata was read: no copy without zarr.json is put in
    # place; once it is gone, the listing's error
    fs.rm(f"/{name}/f/train.zarr/{'x' * 300}")
    fs.rm(f"/{name}/f/train.zarr/zarr.json")
    with pytest.raises(F.StoreError) as e:
        F.mirror_store(url, cache, meta)
    assert str(e.value) == f"store '{url}' could not be copied to '{cache}': its zarr.json is gone"
    assert list(cache.iterdir()) == []
    fs.rm(f"/{name}/f", recursive=True)
    with pytest.raises(FileNotFoundError):
        F.mirror_store(url, cache, meta)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("theirs_whole", [True, False])
def test_read_through_copy_race(bucket, tmp_path, monkeypatch, theirs_whole):
    """Another process puts the same copy in place while this one fetches: its whole copy is used and ours
    dropped; a racing copy that is not whole (no zarr.json) is not used: the rename's error is raised."""
    import os
    import shutil

    name, fs = bucket
    local = small_store(tmp_path / "src" / "train.zarr")
    url = remote_copy_of(fs, name, local)
    cache = tmp_path / "cache"
    real = os.replace

    def theirs_first(src, dst):
        if str(dst).endswith("-train.zarr"):
            shutil.copytree(local, dst)
            if not theirs_whole:
                (Path(dst) / "zarr.json").unlink()
        return real(src, dst)

    monkeypatch.setattr(F.os, "replace", theirs_first)
    if theirs_whole:
        got = F.mirror_store(url, cache)
        assert tree(got) == tree(local)
    else:
        with pytest.raises(OSError):
            F.mirror_store(url, cache)
    assert [p.name.endswith("-train.zarr") for p in cache.iterdir()] == [True], "no partial copy left"


def test_read_through_copy_reuse_makes_no_request_and_makes_its_folder(bucket, tmp_path, monkeypatch):
    """A copy in place is used without a single request to the bucket (not refetched and dropped); the cache
    folder is made with its parents; a fetch that fails before writing anything raises its own error (not one
    from cleaning up a temporary folder that never existed)."""
    name, fs = bucket
    local = small_store(tmp_path / "src" / "train.zarr")
    url = remote_copy_of(fs, name, local)
    cache = tmp_path / "a" / "b" / "cache"
    got = F.mirror_store(url, cache)
    assert tree(got) == tree(local)
    meta = F.read_metadata(got)

    def no_requests(*a, **k):
        raise AssertionError("the bucket was read")

    with monkeypatch.context() as m:
        m.setattr(type(fs), "get", no_requests)
        assert F.mirror_store(url, cache, meta) == got

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    other = tmp_path / "other"
    with monkeypatch.context() as m:
        m.setattr(type(fs), "get", disk_full)
        with pytest.raises(OSError) as e:
            F.mirror_store(url, other, meta)
    assert e.value.errno == 28 and list(other.iterdir()) == []


def test_store_names_depth_vanished_folders_and_folder_names(bucket, monkeypatch):
    """The listing walk: stores up to max_depth folders below the base (default 6), a folder that vanished between
    two listings skipped without ending the walk, folder names with or without a trailing slash (filesystems
    differ), names ending in X kept whole."""
    name, fs = bucket
    for key in ["1/2/3/4/5/6/deep.zarr/zarr.json", "1/2/3/4/5/6/7/deeper.zarr/zarr.json", "a/b/two.zarr/zarr.json",
                "a/b/c/three.zarr/zarr.json", "dataX/in.zarr/zarr.json", "zz/gone.zarr/zarr.json"]:
        fs.pipe(f"/{name}/rX/{key}", b"{}")
    base = f"/{name}/rX"
    assert F._store_names(fs, base + "/") == ["1/2/3/4/5/6/deep.zarr", "a/b/c/three.zarr", "a/b/two.zarr",
                                              "dataX/in.zarr", "zz/gone.zarr"]
    assert F._store_names(fs, base, max_depth=2) == ["a/b/two.zarr", "dataX/in.zarr", "zz/gone.zarr"]
    real = type(fs).ls

    def slash_named(self, path, detail=True, **kw):
        out = real(self, path, detail=detail, **kw)
        return [dict(e, name=e["name"] + "/") if e["type"] == "directory" else e for e in out]

    with monkeypatch.context() as m:
        m.setattr(type(fs), "ls", slash_named)
        assert F._store_names(fs, base, max_depth=2) == ["a/b/two.zarr", "dataX/in.zarr", "zz/gone.zarr"]

    def vanishing(self, path, detail=True, **kw):  # 'zz' (listed last, walked first) deleted once listed
        out = real(self, path, detail=detail, **kw)
        if path.rstrip("/") == base:
            fs.rm(f"{base}/zz", recursive=True)
        return out

    with monkeypatch.context() as m:
        m.setattr(type(fs), "ls", vanishing)
        assert F._store_names(fs, base, max_depth=2) == ["a/b/two.zarr", "dataX/in.zarr"]


def test_verify_store_on_object_storage_says_when_access_fails(bucket, monkeypatch, digits_stores):
    """A chunk that cannot be read because the service refuses access is not 'corrupted': verify_store raises
    the access line, naming the store."""
    name, fs = bucket
    fs.put(str(digits_stores["test"]), f"/{name}/v/test.zarr", recursive=True)
    url = f"memory://{name}/v/test.zarr"
    assert F.verify_store(url) == len(F.read_metadata(url)["chunk_checksums"])
    real = type(fs).cat_file

    def denied(self, path, *a, **k):
        if "/labels/c/" in path:
            raise PermissionError(13, "Forbidden", path)
        return real(self, path, *a, **k)

    monkeypatch.setattr(type(fs), "cat_file", denied)
    with pytest.raises(F.StoreError) as e:
        F.verify_store(url)
    assert str(e.value).startswith("object storage: access denied '") and str(e.value).endswith(f"[{url}]")


@pytest.mark.parametrize("where", ["metadata", "open", "array metadata", "chunk listing", "projection"])
def test_every_read_of_a_store_says_when_access_fails(bucket, monkeypatch, digits_stores, tmp_path, where):
    """Access refused by the service is the access line naming the store, never 'damaged', wherever the read
    is refused: the store's metadata (read_metadata), the group opened with metadata already read
    (open_arrays), an array's metadata and the listing of its chunks (check_intact), the projection's chunks
    (verify_store)."""
    name, fs = bucket
    local = tmp_path / "test.zarr"
    shutil.copytree(digits_stores["test"], local)
    rng = np.random.default_rng(0)
    add_projection(local, rng.normal(size=(3, 32)).astype(np.float32), rng.normal(size=3).astype(np.float32))
    fs.put(str(local), f"/{name}/a/test.zarr", recursive=True)
    url = f"memory://{name}/a/test.zarr"
    meta = F.read_metadata(url)
    assert F.verify_store(url) == len(meta["chunk_checksums"])
    refused = {"metadata": "/a/test.zarr/zarr.json", "open": "/a/test.zarr/zarr.json",
               "array metadata": "/a/test.zarr/cls/zarr.json", "chunk listing": "(no chunk read is refused)",
               "projection": "/a/test.zarr/projection/bias/c/"}[where]
    real = type(fs).cat_file

    def denied(self, path, *a, **k):
        if refused in path:
            raise PermissionError(13, "Forbidden", path)
        return real(self, path, *a, **k)

    monkeypatch.setattr(type(fs), "cat_file", denied)
    if where == "chunk listing":  # the listing of an array's chunk keys (check_intact, chunks=True)
        monkeypatch.setattr(F, "_zarr_unwritten", lambda arr: (_ for _ in ()).throw(PermissionError(13, "Forbidden", url)))
    with pytest.raises(F.StoreError) as e:
        if where == "metadata":
            F.read_metadata(url)
        elif where == "open":
            F.open_arrays(url, meta)
        else:
            F.verify_store(url, progress=False)
    assert str(e.value).startswith("object storage: access denied '") and str(e.value).endswith(f"[{url}]")


def test_feature_set_open_with_a_cache_dir(bucket, digits_stores, tmp_path):
    """FeatureSet.open of a complete store on object storage with cache_dir: copied there once and read from
    the copy (in memory when asked), named by where it lives; without cache_dir it is read where it is and
    nothing is copied; an incomplete store is never cached, and is refused unless allowed."""
    import zarr

    from probes import FeatureSet
    from probes.errors import ProbeError

    name, fs = bucket
    fs.put(str(digits_stores["test"]), f"/{name}/c/test.zarr", recursive=True)
    url = f"memory://{name}/c/test.zarr"
    local = FeatureSet.open(digits_stores["test"], in_memory=True)
    cache = tmp_path / "cache"
    remote = FeatureSet.open(url)
    assert not cache.exists() and remote.path == F.location(url) and not isinstance(remote.cls, np.ndarray)
    cached = FeatureSet.open(url, cache_dir=cache, in_memory=True)
    (copy,) = cache.iterdir()
    assert copy.name.endswith("-test.zarr") and cached.path == F.location(url)
    assert isinstance(cached.cls, np.ndarray) and np.array_equal(cached.cls, local.cls)
    assert np.array_equal(FeatureSet.open(url, cache_dir=cache).ap[:5], local.ap[:5])
    assert list(cache.iterdir()) == [copy]  # reused
    half = tmp_path / "half.zarr"
    shutil.copytree(digits_stores["test"], half)
    g = zarr.open_group(str(half), mode="r+")
    g.attrs.put({**g.attrs, "complete": False})
    with pytest.raises(ProbeError, match=r"is incomplete \(extraction did not finish\)"):
        FeatureSet.open(half)
    fs.put(str(half), f"/{name}/c/half.zarr", recursive=True)
    opened = FeatureSet.open(f"memory://{name}/c/half.zarr", cache_dir=tmp_path / "cache2", allow_incomplete=True)
    assert len(opened) == len(local) and not (tmp_path / "cache2").exists()


def test_object_storage_options_reach_the_filesystem(monkeypatch):
    """What zarr opens and the UPath of an s3:// store carry fresh listings and botocore's retries
    ($ALF_S3_RETRIES), whatever the scheme's case or a '://' later in the key; without universal_pathlib the
    URL is one line naming the missing module and the extra that brings it."""
    import sys

    pytest.importorskip("s3fs")
    pytest.importorskip("upath")
    monkeypatch.setenv("ALF_S3_RETRIES", "3")
    want = F.storage_options("s3")
    assert want["config_kwargs"]["retries"] == {"max_attempts": 3, "mode": "standard"}
    assert F.protocol_of("S3://bkt/a://b.zarr") == "s3" and F.storage_options("memory") == {}
    for url in ("s3://bkt/s.zarr", "s3://bkt/odd://key.zarr"):
        st = F.zarr_store(url, read_only=True)
        assert st.read_only and st.fs.config_kwargs == want["config_kwargs"]
        assert st.fs.dircache.use_listings_cache is False
        assert not F.zarr_store(url, read_only=False).read_only
        assert F.location(url).storage_options == want
    monkeypatch.setitem(sys.modules, "upath", None)  # as if the s3 extra were not installed
    with pytest.raises(F.StoreError) as e:
        F.location("s3://bkt/s.zarr")
    assert str(e.value) == ("'s3://bkt/s.zarr' is on object storage, which needs upath and the filesystem for "
                            "s3:// (pip install 'alfcache[s3]')")
