"""Security and integrity of the registry server (issue 4): tokens, traversal, limits, hashes, atomicity.

Each refusal must be a clear 4xx and leave nothing stored: the branch head does not move and no blob
appears in the blob folder.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import http.client
import json
import os
import pickle
import socket
import socketserver
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from registry_helpers import DATABASES, auth, blob_path, cli, database, free_port, plain_http_uploads, serve
from safetensors.torch import save_file

LIMIT = 1_000_000


@pytest.fixture(scope="module", params=DATABASES)
def registry(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"registry-sec-{request.param}")
    with database(request.param, tmp) as db_url, serve(tmp, db_url, max_upload_bytes=LIMIT) as reg:
        yield reg


@pytest.fixture(autouse=True)
def _uploads(monkeypatch, tmp_path):
    plain_http_uploads(monkeypatch, tmp_path / "hf-home")


def new_repo(registry, name: str) -> str:
    """Create ``acme/NAME`` and return its head commit."""
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo(f"acme/{name}")
    return head(registry, f"acme/{name}")


def head(registry, repo: str) -> str:
    r = httpx.get(f"{registry.url}/api/models/{repo}", headers=auth(registry.token("acme")))
    assert r.status_code == 200, r.text
    return r.json()["sha"]


def ndjson(*items) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


HEADER = {"key": "header", "value": {"summary": "test commit", "description": ""}}


def op(key: str, **value) -> dict:
    return {"key": key, "value": value}


def inline(path: str, data: bytes = b"hello\n") -> dict:
    return op("file", path=path, content=base64.b64encode(data).decode(), encoding="base64")


def lfs(path: str, data: bytes) -> dict:
    return op("lfsFile", path=path, algo="sha256", oid=hashlib.sha256(data).hexdigest(), size=len(data))


def commit(registry, repo: str, body: bytes, token: str | None = "acme",
           revision: str = "main") -> httpx.Response:
    tok = registry.token(token) if token else None
    return httpx.post(f"{registry.url}/api/models/{repo}/commit/{revision}", content=body,
                      headers={"content-type": "application/x-ndjson", **auth(tok)})


def lfs_batch(registry, repo: str, objects: list[dict], token: str = "acme") -> httpx.Response:
    body = {"operation": "upload", "transfers": ["basic"], "objects": objects, "hash_algo": "sha256"}
    url = f"{registry.url}/{repo}.git/info/lfs/objects/batch"
    return httpx.post(url, headers=auth(registry.token(token)), json=body)


def upload_href(registry, repo: str, data: bytes, declared: int | None = None) -> str:
    r = lfs_batch(registry, repo, [{"oid": hashlib.sha256(data).hexdigest(), "size": declared or len(data)}])
    assert r.status_code == 200, r.text
    return r.json()["objects"][0]["actions"]["upload"]["href"]


def raw(registry, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> int:
    """Send ``path`` exactly as written (no client-side normalisation of '..') and return the status."""
    u = urlparse(registry.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def stored(registry, data: bytes) -> bool:
    return blob_path(registry.blobs, hashlib.sha256(data).hexdigest()).exists()


def test_writes_need_a_token_for_their_namespace(registry, tmp_path):
    start = new_repo(registry, "guarded")
    writes = [
        ("POST", "/api/repos/create", {"name": "another", "organization": "acme"}),
        ("POST", "/api/models/acme/guarded/preupload/main",
         {"files": [{"path": "a.txt", "sample": "", "size": 1}]}),
        ("POST", "/acme/guarded.git/info/lfs/objects/batch",
         {"operation": "upload", "objects": [{"oid": "a" * 64, "size": 1}]}),
        ("POST", "/api/models/acme/guarded/tag/main", {"tag": "v1"}),
        ("PUT", "/api/models/acme/guarded/settings", {"private": True}),
        ("DELETE", "/api/repos/delete", {"name": "guarded", "organization": "acme"}),
    ]
    for method, path, body in writes:
        for token, status in ((None, 401), ("emx_not-a-real-token", 401), (registry.token("other"), 403)):
            r = httpx.request(method, registry.url + path, json=body, headers=auth(token))
            assert r.status_code == status, (method, path, token, r.text)
            assert r.headers["x-error-message"]
    for token, status in ((None, 401), (registry.token("other"), 403)):
        r = commit(registry, "acme/guarded", ndjson(HEADER, inline("a.txt")), token=token and "other")
        assert r.status_code == status
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=registry.url, token=registry.token("other")).upload_folder(
            folder_path=tmp_path, repo_id="acme/guarded", commit_message="intruder")
    assert err.value.response.status_code == 403
    assert head(registry, "acme/guarded") == start
    assert httpx.get(f"{registry.url}/api/models/acme/another").status_code == 404


def test_path_traversal_in_repo_ids_and_filenames_is_refused(registry):
    start = new_repo(registry, "paths")
    tok = registry.token("acme")
    for name in ("..", "../evil", "a/b", ".hidden", "%2e%2e", "x.git", "-x", "a" * 97):
        r = httpx.post(f"{registry.url}/api/repos/create", json={"name": name, "organization": "acme"},
                       headers=auth(tok))
        assert r.status_code == 400, (name, r.text)
    for org in ("../acme", "api", ".."):
        r = httpx.post(f"{registry.url}/api/repos/create", json={"name": "ok", "organization": org},
                       headers=auth(tok))
        assert r.status_code == 400, (org, r.text)
    for path in ("/api/models/acme/../../etc/passwd", "/api/models/%2e%2e/%2e%2e",
                 "/%2e%2e/paths/resolve/main/x", "/acme/paths/resolve/main/../../../etc/passwd",
                 "/acme/paths/resolve/main/%2e%2e/%2e%2e/etc/passwd", "/acme/paths/resolve/main//etc/passwd",
                 "/acme/paths/resolve/..%2F..%2Fmain/config.json", "/api/models/acme/paths/tree/main/%2e%2e"):
        for method in ("GET", "HEAD"):
            status = raw(registry, method, path)
            assert 400 <= status < 500, (method, path, status)
    for bad in ("../evil.txt", "/etc/passwd", "a/../../b.txt", "a/%2e%2e/b.txt", ".git/config",
                "a\\..\\b.txt", "a//b.txt", "./x.txt", "", "x\x00.txt"):
        r = commit(registry, "acme/paths", ndjson(HEADER, inline(bad)))
        assert r.status_code == 400, (bad, r.text)
        pre = httpx.post(f"{registry.url}/api/models/acme/paths/preupload/main", headers=auth(tok),
                         json={"files": [{"path": bad, "sample": "", "size": 3}]})
        assert pre.status_code == 400, (bad, pre.text)
    assert head(registry, "acme/paths") == start
    assert not stored(registry, b"hello\n")


def test_oversize_uploads_are_refused_with_nothing_stored(registry, tmp_path):
    start = new_repo(registry, "big")
    big = os.urandom(LIMIT + 1)
    (tmp_path / "big.dat").write_bytes(big)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=registry.url, token=registry.token("acme")).upload_folder(
            folder_path=tmp_path, repo_id="acme/big", commit_message="too big")
    assert err.value.response.status_code == 413
    r = lfs_batch(registry, "acme/big", [{"oid": hashlib.sha256(big).hexdigest(), "size": len(big)}])
    assert r.status_code == 413 and str(LIMIT) in r.headers["x-error-message"]
    # A client that declares a small file and then sends more is cut off at the declared size.
    href = upload_href(registry, "acme/big", big[:10])
    assert httpx.put(href, content=big[:20]).status_code == 413
    chunked = httpx.put(upload_href(registry, "acme/big", big[:10]), content=iter([big[:8], big[8:30]]))
    assert chunked.status_code == 413
    assert commit(registry, "acme/big", ndjson(HEADER, inline("big.txt", big))).status_code == 413
    huge_json = b'{"files": [' + b" " * (9 << 20) + b"]}"
    for body in (huge_json, iter([huge_json[: 1 << 20], huge_json[1 << 20:]])):  # declared length, chunked
        r = httpx.post(f"{registry.url}/api/models/acme/big/preupload/main", content=body,
                       headers={"content-type": "application/json", **auth(registry.token("acme"))})
        assert r.status_code == 413
    # only the commit route itself reads past the JSON limit: a path that merely holds '/commit/' does not
    for path in ("/api/models/commit/x/tag/main", "/api/models/acme/big/branch/commit/x"):
        r = httpx.post(registry.url + path, content=huge_json, headers={"content-type": "application/json"})
        assert r.status_code == 413, (path, r.text)
    assert head(registry, "acme/big") == start
    assert not stored(registry, big) and not stored(registry, big[:10])


def test_wrong_sha256_or_size_is_refused_with_nothing_stored(registry):
    start = new_repo(registry, "hashes")
    data, other = os.urandom(4096), os.urandom(4096)
    r = httpx.put(upload_href(registry, "acme/hashes", data), content=other)
    assert r.status_code == 400 and "sha256" in r.headers["x-error-message"]
    r = httpx.put(upload_href(registry, "acme/hashes", data), content=data[:100])
    assert r.status_code == 400
    assert not stored(registry, data) and not stored(registry, other)
    r = commit(registry, "acme/hashes", ndjson(HEADER, lfs("w.dat", data)))
    assert r.status_code == 400 and "not uploaded" in r.headers["x-error-message"]
    bad = lfs_batch(registry, "acme/hashes", [{"oid": "not-a-sha", "size": 3}])
    assert bad.status_code == 400
    assert head(registry, "acme/hashes") == start


def test_malformed_commit_payloads_are_refused(registry):
    start = new_repo(registry, "payloads")
    data = os.urandom(64)
    cases = {
        "empty body": b"",
        "not JSON": b"{not json\n",
        "no header": ndjson(inline("a.txt")),
        "header without summary": ndjson(op("header"), inline("a.txt")),
        "header only": ndjson(HEADER),
        "a list": b"[1, 2]\n",
        "unknown key": ndjson(HEADER, op("symlink", path="a")),
        "bad base64": ndjson(HEADER, op("file", path="a.txt", content="@@@", encoding="base64")),
        "bad encoding": ndjson(HEADER, op("file", path="a.txt", content="x", encoding="rot13")),
        "content not a string": ndjson(HEADER, op("file", path="a.txt", content=5)),
        "bad oid": ndjson(HEADER, op("lfsFile", path="w.dat", oid="xyz", size=1)),
        "negative size": ndjson(HEADER, op("lfsFile", path="w.dat", oid="a" * 64, size=-1)),
        "blob never uploaded": ndjson(HEADER, lfs("w.dat", data)),
        "file and folder at once": ndjson(HEADER, inline("a"), inline("a/b")),
        "delete a missing file": ndjson(HEADER, op("deletedFile", path="missing.txt")),
        "stale parent": ndjson(op("header", summary="x", parentCommit="0" * 40), inline("a")),
    }
    for why, body in cases.items():
        r = commit(registry, "acme/payloads", body)
        assert 400 <= r.status_code < 500, (why, r.status_code, r.text)
        assert r.json()["error"], why
    tok = registry.token("acme")
    assert httpx.post(f"{registry.url}/api/models/acme/payloads/preupload/main", headers=auth(tok),
                      json={"files": "all of them"}).status_code == 400
    assert httpx.post(f"{registry.url}/acme/payloads.git/info/lfs/objects/batch", headers=auth(tok),
                      json={"operation": "upload", "objects": [{"oid": "a" * 64}]}).status_code == 400
    assert head(registry, "acme/payloads") == start
    assert not stored(registry, b"hello\n")


def test_unknown_revisions_are_404_revision_not_found(registry, tmp_path):
    new_repo(registry, "revs")
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    for rev in ("nope", "0" * 40, "v9.9"):
        with pytest.raises(RevisionNotFoundError):
            api.model_info("acme/revs", revision=rev)
        with pytest.raises(RevisionNotFoundError):
            api.list_repo_files("acme/revs", revision=rev)
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download("acme/revs", "README.md", revision=rev, endpoint=registry.url,
                            cache_dir=tmp_path / "c", token=False)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("acme/revs", revision="nope", endpoint=registry.url, cache_dir=tmp_path / "s",
                          token=False)
    r = commit(registry, "acme/revs", ndjson(HEADER, inline("a.txt")), revision="dev")
    assert r.status_code == 404 and r.headers["x-error-code"] == "RevisionNotFound"
    api.create_tag("acme/revs", tag="v1")
    assert commit(registry, "acme/revs", ndjson(HEADER, inline("a.txt")), revision="v1").status_code == 400
    assert raw(registry, "GET", "/api/models/acme/revs/revision/nope") == 404


def _put_status(registry, repo: str, data: bytes) -> int:
    return httpx.put(upload_href(registry, repo, data), content=data).status_code


def test_pickles_are_refused_weights_must_be_safetensors(registry, tmp_path):
    start = new_repo(registry, "pickles")
    for name in ("pytorch_model.bin", "model.pt", "weights.PKL", "sub/model.ckpt"):
        assert commit(registry, "acme/pickles", ndjson(HEADER, inline(name))).status_code == 400, name
    pickled = pickle.dumps({"w": collections.OrderedDict(a=os.urandom(600))}, protocol=4)
    assert _put_status(registry, "acme/pickles", pickled) == 400
    assert _put_status(registry, "acme/pickles", b"\x80\x04\x95" + os.urandom(600)) == 200  # a header, no pickle
    # protocols 0 and 1 have no header; their opcodes give them away, whatever the file's name
    for protocol in (0, 1):
        old_style = pickle.dumps({"w": [collections.OrderedDict(a=i) for i in range(60)]}, protocol=protocol)
        assert commit(registry, "acme/pickles", ndjson(HEADER, inline("state.dat", old_style))).status_code == 400
        assert _put_status(registry, "acme/pickles", old_style + b" " * 600) == 400
    torch.save({"w": torch.zeros(3)}, tmp_path / "t.zip")
    assert _put_status(registry, "acme/pickles", (tmp_path / "t.zip").read_bytes()) == 400
    assert not stored(registry, pickled)
    not_safetensors = b"plain text pretending to be safetensors " * 20
    assert _put_status(registry, "acme/pickles", not_safetensors) == 200  # harmless bytes; the name decides
    r = commit(registry, "acme/pickles", ndjson(HEADER, lfs("model.safetensors", not_safetensors)))
    assert r.status_code == 400 and "safetensors" in r.headers["x-error-message"]
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "pytorch_model.bin").write_bytes(pickled)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=registry.url, token=registry.token("acme")).upload_folder(
            folder_path=tmp_path / "up", repo_id="acme/pickles", commit_message="pickle")
    assert err.value.response.status_code == 400
    save_file({"w": torch.ones(4)}, tmp_path / "ok.safetensors")
    good = (tmp_path / "ok.safetensors").read_bytes()
    assert _put_status(registry, "acme/pickles", good) == 200
    r = commit(registry, "acme/pickles", ndjson(HEADER, lfs("model.safetensors", good)))
    assert r.status_code == 200 and r.json()["commitOid"] != start


def test_a_pickle_past_the_head_or_compressed_is_refused_by_the_whole_file_check(registry, tmp_path):
    """The first bytes of an upload show nothing here: the staged file is read whole before it is stored."""
    start = new_repo(registry, "hidden")
    late = pickle.dumps({"pad": os.urandom(4096), "w": collections.OrderedDict(a=1)}, protocol=4)
    r = httpx.put(upload_href(registry, "acme/hidden", late), content=late)
    assert r.status_code == 400, r.text
    assert r.headers["x-error-message"] == (
        f"blob {hashlib.sha256(late).hexdigest()}: content is a Python pickle that imports and calls code "
        f"(collections.OrderedDict); weights must be safetensors")
    assert not stored(registry, late)
    r = commit(registry, "acme/hidden", ndjson(HEADER, inline("notes.txt", late)))  # inline: the same check
    assert r.status_code == 400 and r.headers["x-error-message"].startswith("notes.txt: content is a Python pickle")
    # a gzip'd pickle named like text, through a Hub client: refused, named, and the branch does not move
    (tmp_path / "notes.txt").write_bytes(gzip.compress(pickle.dumps(collections.OrderedDict(a=1))))
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=registry.url, token=registry.token("acme")).upload_file(
            path_or_fileobj=tmp_path / "notes.txt", path_in_repo="notes.txt", repo_id="acme/hidden")
    assert err.value.response.status_code == 400
    assert "notes.txt: content (gzip-compressed) is a Python pickle that imports and calls code" \
        in err.value.response.headers["x-error-message"]
    assert head(registry, "acme/hidden") == start
    # a safetensors file whose 640-byte header length starts 0x80 0x02, like a pickle's header, is stored
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata={"note": ""})
    bare = int.from_bytes((tmp_path / "m.safetensors").read_bytes()[:8], "little")
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata={"note": "x" * (0x280 - bare)})
    good = (tmp_path / "m.safetensors").read_bytes()
    assert good[:2] == b"\x80\x02"
    assert _put_status(registry, "acme/hidden", good) == 200
    assert commit(registry, "acme/hidden", ndjson(HEADER, lfs("model.safetensors", good))).status_code == 200


def test_a_private_blob_cannot_be_committed_elsewhere_by_its_sha256(registry):
    """Blobs are stored once for all repos; another namespace that knows a private file's sha256 (a mix records its
    experts') must upload the bytes to use them, and the batch answer does not reveal that they are stored."""
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/secret", private=True)
    secret = os.urandom(4096)
    api.upload_file(path_or_fileobj=secret, path_in_repo="weights.dat", repo_id="acme/secret")
    HfApi(endpoint=registry.url, token=registry.token("other")).create_repo("other/steal")
    oid = {"oid": hashlib.sha256(secret).hexdigest(), "size": len(secret)}
    asked = lfs_batch(registry, "other/steal", [oid], token="other")
    assert asked.status_code == 200 and "upload" in asked.json()["objects"][0]["actions"]  # as for unknown bytes
    verify = httpx.post(f"{registry.url}/api/lfs/verify/other/steal", json=oid, headers=auth(registry.token("other")))
    assert verify.status_code == 404
    r = commit(registry, "other/steal", ndjson(HEADER, lfs("stolen.dat", secret)), token="other")
    assert r.status_code == 400 and "was not uploaded" in r.headers["x-error-message"]
    assert httpx.get(f"{registry.url}/other/steal/resolve/main/stolen.dat").status_code == 404
    # the owner reuses its own blob without uploading again; a writer holding the bytes uploads them and may commit
    assert "actions" not in lfs_batch(registry, "acme/secret", [oid]).json()["objects"][0]
    href = lfs_batch(registry, "other/steal", [oid], token="other").json()["objects"][0]["actions"]["upload"]["href"]
    assert httpx.put(href, content=secret).status_code == 200
    assert commit(registry, "other/steal", ndjson(HEADER, lfs("mine.dat", secret)), token="other").status_code == 200


def test_a_commit_is_atomic_all_files_or_none(registry):
    start = new_repo(registry, "atomic")
    keep = b"first file of a commit that fails later\n"
    body = ndjson(HEADER, inline("notes.txt", keep), lfs("w.dat", os.urandom(99)))
    r = commit(registry, "acme/atomic", body)
    assert r.status_code == 400
    assert head(registry, "acme/atomic") == start and not stored(registry, keep)
    half_expert = b"---\nexpert:\n  name: x\n  domain: math\n  kind: dense\n---\n"
    body = ndjson(HEADER, inline("README.md", half_expert), inline("notes.txt", keep))
    r = commit(registry, "acme/atomic", body)
    assert r.status_code == 400 and "expert" in r.headers["x-error-message"]
    assert head(registry, "acme/atomic") == start and not stored(registry, keep)
    r = commit(registry, "acme/atomic", ndjson(HEADER, inline("notes.txt", keep)))
    assert r.status_code == 200 and head(registry, "acme/atomic") == r.json()["commitOid"]


def test_a_killed_upload_leaves_nothing_visible_and_can_be_retried(registry, tmp_path):
    start = new_repo(registry, "killed")
    data = os.urandom(400_000)
    href = urlparse(upload_href(registry, "acme/killed", data))
    with socket.create_connection((href.hostname, href.port)) as s:
        request = f"PUT {href.path} HTTP/1.1\r\nHost: {href.netloc}\r\nContent-Length: {len(data)}\r\n\r\n"
        s.sendall(request.encode())
        s.sendall(data[: len(data) // 2])
    staging = registry.blobs / ".staging"
    deadline = time.time() + 10
    while staging.exists() and any(staging.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    assert not staging.exists() or not any(staging.iterdir())
    assert not stored(registry, data) and head(registry, "acme/killed") == start
    again = lfs_batch(registry, "acme/killed", [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}])
    assert "actions" in again.json()["objects"][0]  # the server still wants the whole blob
    assert commit(registry, "acme/killed", ndjson(HEADER, lfs("w.dat", data))).status_code == 400
    (tmp_path / "w.dat").write_bytes(data)
    done = HfApi(endpoint=registry.url, token=registry.token("acme")).upload_folder(
        folder_path=tmp_path, repo_id="acme/killed", commit_message="retry")
    got = hf_hub_download("acme/killed", "w.dat", revision=done.oid, endpoint=registry.url,
                          cache_dir=tmp_path / "c", token=False)
    assert open(got, "rb").read() == data


def repo_with_one_file(registry, name: str, tmp_path) -> bytes:
    """``acme/NAME`` holding ``w.dat``: almost the upload limit of random bytes (returned)."""
    new_repo(registry, name)
    data = os.urandom(LIMIT - 1000)
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "w.dat").write_bytes(data)
    HfApi(endpoint=registry.url, token=registry.token("acme")).upload_folder(
        folder_path=tmp_path / "up", repo_id=f"acme/{name}", commit_message="bits")
    return data


def test_a_corrupt_blob_is_never_delivered_whole(registry, tmp_path):
    data = repo_with_one_file(registry, "rot", tmp_path)
    blob = blob_path(registry.blobs, hashlib.sha256(data).hexdigest())
    url = f"{registry.url}/acme/rot/resolve/main/w.dat"
    os.chmod(blob, 0o644)
    rotten = bytearray(data)
    rotten[-1] ^= 0xFF
    blob.write_bytes(bytes(rotten))
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("GET", url) as resp:
            assert resp.status_code == 200
            b"".join(resp.iter_bytes())
    # A client resuming the cut download asks for the rest: the server hashes the blob first and refuses.
    rest = httpx.get(url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert rest.status_code == 500 and "does not match its sha256" in rest.headers["x-error-message"]
    # expertmix pull resumes the cut stream with a range, so the user reads the registry's own diagnosis.
    env = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_HOME": str(tmp_path / "home")}
    proc = cli("pull", "acme/rot", env=env, check=False)
    assert proc.returncode == 1 and "does not match its sha256" in proc.stderr, proc.stderr
    assert "talking to the registry" not in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "home").rglob("w.dat"))  # nothing half-downloaded is left in the cache


class _CuttingProxy(socketserver.ThreadingTCPServer):
    """A loopback proxy to the registry that cuts the first whole-file download after ``cut`` response bytes."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, upstream: str, cut: int, drop_range: bool = False):
        self.upstream, self.cut, self.cuts, self.ranges = urlparse(upstream), cut, 0, []
        self.drop_range = drop_range  # a proxy that strips Range headers: the registry answers 200, whole files
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(socketserver.BaseRequestHandler):
    def handle(self):
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            request += chunk
        head = request.split(b"\r\n\r\n")[0].decode().lower()
        length = int(next((h.split(":")[1] for h in head.split("\r\n") if h.startswith("content-length:")), 0))
        while len(request.split(b"\r\n\r\n", 1)[1]) < length:
            request += self.request.recv(65536)
        server = self.server
        cut = "/resolve/" in head.split("\r\n")[0] and "range:" not in head and server.cuts == 0
        if "range:" in head:
            line = next(h for h in head.split("\r\n") if h.startswith("range:"))
            server.ranges.append(line)
            if server.drop_range:
                lines = request.split(b"\r\n")
                request = b"\r\n".join(x for x in lines if not x.lower().startswith(b"range:"))
        with socket.create_connection((server.upstream.hostname, server.upstream.port)) as up:
            up.sendall(request)
            sent = 0
            while data := up.recv(65536):
                if cut and sent + len(data) > server.cut:
                    self.request.sendall(data[: server.cut - sent])
                    server.cuts += 1
                    return  # the connection drops mid-body
                self.request.sendall(data)
                sent += len(data)


@pytest.mark.parametrize("drop_range", [False, True], ids=["range-honoured", "range-dropped-by-a-proxy"])
def test_a_download_cut_mid_file_resumes_from_where_it_stopped(registry, tmp_path, drop_range):
    """A dropped connection costs no bytes already received: pull asks for the rest and the file arrives whole
    (through a proxy that drops the Range header, the whole file comes again and replaces the part)."""
    data = repo_with_one_file(registry, f"blip-{drop_range}".lower(), tmp_path)
    proxy = _CuttingProxy(registry.url, cut=300_000, drop_range=drop_range)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        env = {"EXPERTMIX_REGISTRY": f"http://127.0.0.1:{proxy.server_address[1]}",
               "EXPERTMIX_HOME": str(tmp_path / "home")}
        proc = cli("pull", f"acme/blip-{drop_range}".lower(), env=env)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.cuts == 1 and len(proxy.ranges) == 1 and proxy.ranges[0].endswith("-")
    resumed_at = int(proxy.ranges[0].split("=")[1].rstrip("-"))
    assert 0 < resumed_at < len(data)  # asked only for the bytes it lacked
    assert (Path(proc.stdout.strip()) / "w.dat").read_bytes() == data


def test_pulling_an_empty_repo_says_nothing_was_published_to_it(registry, tmp_path):
    new_repo(registry, "empty")
    env = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_HOME": str(tmp_path / "home")}
    proc = cli("pull", "acme/empty", env=env, check=False)
    assert proc.returncode == 1 and "acme/empty holds no files" in proc.stderr and "empty repo" in proc.stderr
    assert proc.stdout == ""


def test_a_token_the_registry_does_not_know_is_named_as_such(registry, tmp_path):
    env = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_HOME": str(tmp_path / "home"),
           "EXPERTMIX_TOKEN": "emx_not-a-real-token"}
    proc = cli("search", "--domain", "de", env=env, check=False)
    assert proc.returncode == 1 and "answered 401" in proc.stderr, proc.stderr
    assert "the registry does not know this token" in proc.stderr and "set $EXPERTMIX_TOKEN" not in proc.stderr


def test_a_revoked_token_is_refused_at_once_and_token_list_never_shows_secrets(registry, tmp_path):
    leaked = registry.token("leaky")
    listed = json.loads(cli("token", "list", "--namespace", "leaky", "--database", registry.database_url,
                            "--json").stdout)
    assert [t["namespace"] for t in listed] == ["leaky"] and leaked not in json.dumps(listed)
    assert httpx.get(f"{registry.url}/api/whoami-v2", headers=auth(leaked)).status_code == 200
    revoked = cli("token", "revoke", str(listed[0]["id"]), "--database", registry.database_url)
    assert "revoked token" in revoked.stdout and "leaky" in revoked.stdout
    assert httpx.get(f"{registry.url}/api/whoami-v2", headers=auth(leaked)).status_code == 401
    r = httpx.post(f"{registry.url}/api/repos/create", json={"name": "after", "organization": "leaky"},
                   headers=auth(leaked))
    assert r.status_code == 401
    again = cli("token", "revoke", str(listed[0]["id"]), "--database", registry.database_url, check=False)
    assert again.returncode == 1 and f"no token with id {listed[0]['id']}" in again.stderr


def test_an_unreachable_or_driverless_database_is_named_in_one_line_with_its_password_hidden(tmp_path):
    """`serve` and `token create` on a database they cannot open: exit 1, the URL without its password, the reason."""
    closed = f"postgresql+psycopg://reg:s3cret-pw@127.0.0.1:{free_port()}/registry"  # nothing listens there
    env = {"EXPERTMIX_HOME": str(tmp_path / "home")}
    for args in (["serve", "--port", str(free_port()), "--database", closed],
                 ["token", "create", "--namespace", "org", "--database", closed]):
        proc = cli(*args, env=env, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert "cannot open the registry database postgresql+psycopg://reg:***@127.0.0.1" in out
        assert "s3cret-pw" not in out and "Traceback" not in out and "refused" in out.lower()
    proc = cli("serve", "--database", "mysql://reg:s3cret-pw@127.0.0.1/registry", env=env, check=False)
    assert proc.returncode == 1 and "its driver is not installed" in proc.stderr and "s3cret-pw" not in proc.stderr


def test_token_create_refuses_a_database_that_is_not_a_registry_unless_told_to_make_one(tmp_path):
    """A mistyped --database used to become a new empty registry whose token the real server rejects: now it is
    refused and no file appears; --init makes a new registry whose token a server on it then accepts."""
    import sqlite3

    env = {"EXPERTMIX_HOME": str(tmp_path / "home")}
    typo = tmp_path / "regsitry.db"
    proc = cli("token", "create", "--namespace", "org", "--database", f"sqlite:///{typo}", env=env, check=False)
    assert proc.returncode == 1 and f"no registry database at {typo}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not typo.exists()
    other = tmp_path / "other.db"  # some other application's SQLite file
    sqlite3.connect(other).execute("CREATE TABLE notes (x TEXT)").connection.commit()
    proc = cli("token", "create", "--namespace", "org", "--database", f"sqlite:///{other}", env=env, check=False)
    assert proc.returncode == 1 and "is not an expertmix registry (no blobs, commit_files, " in proc.stderr, \
        proc.stderr
    assert {r[0] for r in sqlite3.connect(other).execute("SELECT name FROM sqlite_master")} == {"notes"}
    empty = tmp_path / "empty.db"
    empty.touch()
    proc = cli("token", "create", "--namespace", "org", "--database", f"sqlite:///{empty}", env=env, check=False)
    assert proc.returncode == 1 and "is not an expertmix registry" in proc.stderr
    assert empty.stat().st_size == 0  # a refused database is left exactly as it was
    before = other.read_bytes()
    cli("token", "create", "--namespace", "org", "--database", f"sqlite:///{other}", env=env, check=False)
    assert other.read_bytes() == before and not other.with_name("other.db-wal").exists()

    fresh = f"sqlite:///{tmp_path / 'new.db'}"
    token = cli("token", "create", "--namespace", "org", "--database", fresh, "--init", env=env).stdout.strip()
    # a registry made before blob holders existed is still a registry: opening it adds what it lacks
    with sqlite3.connect(tmp_path / "new.db") as con:
        con.execute("DROP INDEX ix_commit_files_sha256")
        con.execute("DROP TABLE blob_holders")
    cli("token", "create", "--namespace", "late", "--database", fresh, env=env)
    with sqlite3.connect(tmp_path / "new.db") as con:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    assert {"blob_holders", "ix_commit_files_sha256"} <= names
    with serve(tmp_path, fresh) as reg:
        HfApi(endpoint=reg.url, token=token).create_repo("org/x")
        assert httpx.get(f"{reg.url}/api/models/org/x").status_code == 200


def test_malformed_card_yaml_and_query_values_are_400_not_500(registry):
    """YAML the parser rejects (an unclosed list, a python tag) and a non-integer limit are the client's error."""
    for content in ("---\nlicense: [unclosed\n---\n", "---\nlicense: !!python/object/apply:os.system ['x']\n---\n"):
        res = httpx.post(f"{registry.url}/api/validate-yaml", json={"content": content})
        assert res.status_code == 400 and "front matter is not valid YAML" in res.json()["errors"][0]["message"]
    res = httpx.get(f"{registry.url}/api/models", params={"limit": "abc"})
    assert res.status_code == 400 and "limit='abc'" in res.text
