"""Registry hardening: spooled and capped commit payloads, quiet disconnects, case-insensitive repo ids, token
revocation, full git refs, list_models filters, Hub-shaped 404/405, and operational failures named clearly.

Each test drives a real ``expertmix serve`` process (SQLite, and PostgreSQL when EXPERTMIX_TEST_POSTGRES_URL is
set) with huggingface_hub or httpx, except the unreachable-database test, which swaps the database of an app
under Starlette's (httpx) TestClient.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from registry_helpers import DATABASES, auth, blob_path, cli, database, make_expert, plain_http_uploads, serve

MAX_COMMIT = 3_000_000
MAX_LINE = 1_000_000


@pytest.fixture(scope="module", params=DATABASES)
def registry(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"registry-ops-{request.param}")
    env = {"EXPERTMIX_REGISTRY_MAX_COMMIT_BYTES": str(MAX_COMMIT),
           "EXPERTMIX_REGISTRY_MAX_COMMIT_LINE_BYTES": str(MAX_LINE)}
    with database(request.param, tmp) as db_url, serve(tmp, db_url, env=env) as reg:
        reg.log = tmp / f"server-{urlparse(reg.url).port}.log"
        yield reg


@pytest.fixture(autouse=True)
def _uploads(monkeypatch, tmp_path):
    plain_http_uploads(monkeypatch, tmp_path / "hf-home")


def ndjson(*items) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


HEADER = {"key": "header", "value": {"summary": "ops test", "description": ""}}


def inline(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


def staging_files(registry) -> list[Path]:
    return list((registry.blobs / ".staging").glob("*"))


def text(n: int, seed: str) -> bytes:
    """``n`` bytes of text (so preupload sends it inline) that differ per ``seed``."""
    line = (hashlib.sha256(seed.encode()).hexdigest() + "\n").encode()
    return (line * (n // len(line) + 1))[:n]


def test_commit_payloads_are_spooled_capped_at_413_and_a_failed_one_leaves_nothing(registry):
    """A payload larger than memory's spool (several MB of inline files) lands whole; one over max_commit_bytes
    (declared or chunked) or with a line over the per-line cap is 413 naming the limit; a refused commit leaves no
    blob and no staging file behind."""
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/spooled")
    files = {f"notes/{i}.md": text(600_000, f"spooled-{i}") for i in range(3)}  # inline: ~2.4 MB of base64
    made = api.create_commit("acme/spooled", [CommitOperationAdd(p, d) for p, d in files.items()],
                             commit_message="big inline commit")
    for path, data in files.items():
        assert Path(hf_hub_download("acme/spooled", path, revision=made.oid, endpoint=registry.url)).read_bytes() \
            == data
    start = api.model_info("acme/spooled").sha

    too_many = [CommitOperationAdd(f"more/{i}.md", text(600_000, f"over-{i}")) for i in range(5)]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit("acme/spooled", too_many, commit_message="over the cap")
    assert err.value.response.status_code == 413 and f"limit of {MAX_COMMIT} bytes" in str(err.value)

    url = f"{registry.url}/api/models/acme/spooled/commit/main"
    headers = {"content-type": "application/x-ndjson", **auth(registry.token("acme"))}

    def chunked():  # no Content-Length: the cap is applied as the body streams in
        yield json.dumps(HEADER).encode() + b"\n"
        for _ in range(40):
            yield b" " * 100_000 + b"\n"

    r = httpx.post(url, content=chunked(), headers=headers)
    assert r.status_code == 413 and "max_commit_bytes" in r.json()["error"]
    long_line = ndjson(HEADER, inline("long.md", text(MAX_LINE, "long")))
    r = httpx.post(url, content=long_line, headers=headers)
    assert r.status_code == 413 and f"line 2 is over the limit of {MAX_LINE} bytes" in r.json()["error"]

    doomed = text(5000, "doomed")
    r = httpx.post(url, content=ndjson(HEADER, inline("ok.md", doomed),
                                       {"key": "deletedFile", "value": {"path": "missing.md"}}), headers=headers)
    assert r.status_code == 404 and "missing.md" in r.json()["error"]
    assert not blob_path(registry.blobs, hashlib.sha256(doomed).hexdigest()).exists()
    assert staging_files(registry) == []
    assert api.model_info("acme/spooled").sha == start


def test_a_client_that_disconnects_mid_payload_is_logged_quietly_and_holds_nothing(registry):
    HfApi(endpoint=registry.url, token=registry.token("acme")).create_repo("acme/gone")
    u = urlparse(registry.url)
    head = (f"POST /api/models/acme/gone/commit/main HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Authorization: Bearer {registry.token('acme')}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: 500000\r\n\r\n").encode()
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(head + json.dumps(HEADER).encode() + b"\n" + b" " * 10_000)
        time.sleep(0.3)
    time.sleep(0.5)
    # the server kept no transaction open meanwhile and is well: the next commit lands at once
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.upload_file(path_or_fileobj=b"after\n", path_in_repo="after.txt", repo_id="acme/gone")
    assert api.list_repo_files("acme/gone") == ["after.txt"]
    log = registry.log.read_text(errors="replace")
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]
    assert staging_files(registry) == []


def test_repo_ids_are_case_insensitive_like_the_hub(registry):
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/expert")
    api.upload_file(path_or_fileobj=b"one\n", path_in_repo="a.txt", repo_id="acme/expert")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("acme/Expert")
    assert err.value.response.status_code == 409 and "the repo acme/expert already exists" in str(err.value)
    assert api.create_repo("acme/EXPERT", exist_ok=True).repo_id == "acme/expert"
    assert api.model_info("Acme/Expert").id == "acme/expert"
    assert Path(hf_hub_download("ACME/expert", "a.txt", endpoint=registry.url)).read_text() == "one\n"
    api.upload_file(path_or_fileobj=b"two\n", path_in_repo="b.txt", repo_id="acme/EXPERT")
    assert api.list_repo_files("acme/expert") == ["a.txt", "b.txt"]
    assert [m.id for m in api.list_models(author="ACME", search="EXPERT")] == ["acme/expert"]
    # namespaces ignore case too: the acme token writes under any spelling, and new repos take acme's
    shouty = HfApi(endpoint=registry.url, token=registry.token("acme"))
    shouty.upload_file(path_or_fileobj=b"x\n", path_in_repo="x.txt", repo_id="ACME/Expert")
    assert api.list_repo_files("acme/expert") == ["a.txt", "b.txt", "x.txt"]
    assert shouty.create_repo("ACME/secret", private=True).repo_id == "acme/secret"
    shouty.upload_file(path_or_fileobj=b"s\n", path_in_repo="s.txt", repo_id="Acme/Secret")
    assert Path(hf_hub_download("ACME/SECRET", "s.txt", endpoint=registry.url,
                                token=registry.token("acme"))).read_text() == "s\n"
    assert httpx.get(f"{registry.url}/api/models/acme/secret").status_code == 404  # still private to others
    # so a second spelling of a namespace gets no token: it would write to the first one's repos
    res = cli("token", "create", "--namespace", "Acme", "--database", registry.database_url, check=False)
    assert res.returncode == 1 and "'Acme' is spelled 'acme' on this registry" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    listed = json.loads(cli("token", "list", "--namespace", "ACME", "--database", registry.database_url,
                            "--json").stdout)
    assert {t["namespace"] for t in listed} == {"acme"}


def test_a_revoked_token_is_401_saying_so_and_its_upload_urls_stop_working(registry, tmp_path):
    token = registry.token("revk")
    HfApi(endpoint=registry.url, token=token).create_repo("revk/w")
    data = b"\x00weights" * 100
    batch = {"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
             "objects": [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}]}
    r = httpx.post(f"{registry.url}/revk/w.git/info/lfs/objects/batch", json=batch, headers=auth(token))
    href = r.json()["objects"][0]["actions"]["upload"]["href"]
    listed = json.loads(cli("token", "list", "--namespace", "revk", "--database", registry.database_url,
                            "--json").stdout)
    cli("token", "revoke", str(listed[0]["id"]), "--database", registry.database_url)

    r = httpx.get(f"{registry.url}/api/whoami-v2", headers=auth(token))
    assert r.status_code == 401 and f"token (id {listed[0]['id']}) was revoked" in r.json()["error"]
    env = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_HOME": str(tmp_path / "home"), "EXPERTMIX_TOKEN": token}
    proc = cli("search", "--domain", "de", env=env, check=False)  # the CLI passes the server's word on
    assert proc.returncode == 1 and "was revoked" in proc.stderr and "does not know this token" not in proc.stderr
    r = httpx.put(href, content=data)
    assert r.status_code == 401 and "upload URL refused" in r.json()["error"] and "revoked" in r.json()["error"]
    assert not blob_path(registry.blobs, hashlib.sha256(data).hexdigest()).exists()
    assert json.loads(cli("token", "list", "--namespace", "revk", "--database", registry.database_url,
                          "--json").stdout) == []
    again = cli("token", "revoke", str(listed[0]["id"]), "--database", registry.database_url, check=False)
    assert again.returncode == 1 and "it was revoked at" in again.stderr


def test_full_refs_name_their_branch_or_tag_and_pull_request_refs_are_400(registry, tmp_path):
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/refs")
    first = api.upload_file(path_or_fileobj=b"v1\n", path_in_repo="a.txt", repo_id="acme/refs").oid
    api.create_tag("acme/refs", tag="v1", revision="refs/heads/main")
    second = api.upload_file(path_or_fileobj=b"v2\n", path_in_repo="a.txt", repo_id="acme/refs",
                             revision="refs/heads/main").oid
    assert api.model_info("acme/refs", revision="refs/heads/main").sha == second
    assert api.model_info("acme/refs", revision="refs/tags/v1").sha == first
    assert [f.path for f in api.list_repo_tree("acme/refs", revision="refs/tags/v1")] == ["a.txt"]
    got = hf_hub_download("acme/refs", "a.txt", revision="refs/tags/v1", endpoint=registry.url,
                          cache_dir=tmp_path / "c")
    assert Path(got).read_text() == "v1\n"
    raw = httpx.get(f"{registry.url}/acme/refs/resolve/refs/tags/v1/a.txt")  # slashes not encoded
    assert raw.status_code == 200 and raw.content == b"v1\n"
    assert httpx.get(f"{registry.url}/api/experts/acme/refs", params={"revision": "refs/pr/1"}).status_code == 400
    for call in (lambda: api.model_info("acme/refs", revision="refs/pr/1"),
                 lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="acme/refs",
                                         revision="refs/pr/2")):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 400 and "pull-request refs are not supported" in str(err.value)


@pytest.fixture(scope="module")
def expert_folder(tmp_path_factory, llama_seed):
    return make_expert(tmp_path_factory.mktemp("ops-expert") / "e", llama_seed, "e", "math", torch.ones(8))


def test_list_models_sorts_filters_and_refuses_filters_it_does_not_serve(registry, expert_folder):
    api = HfApi(endpoint=registry.url, token=registry.token("lst"))
    for name in ("b", "a", "c"):
        api.create_repo(f"lst/{name}")
    api.upload_folder(folder_path=expert_folder, repo_id="lst/a")  # the newest commit, and the only expert
    assert [m.id for m in api.list_models(author="lst", sort="lastModified")] == ["lst/a", "lst/c", "lst/b"]
    assert [m.id for m in api.list_models(author="lst", sort="id")] == ["lst/a", "lst/b", "lst/c"]
    assert [m.id for m in api.list_models(author="lst", sort="downloads", limit=2)] == ["lst/a", "lst/b"]
    assert [m.id for m in api.list_models(author="lst", pipeline_tag="text-generation")] == ["lst/a"]
    assert list(api.list_models(author="lst", pipeline_tag="image-classification")) == []
    assert list(api.list_models(author="lst", gated=True)) == []
    assert len(list(api.list_models(author="lst", gated=False))) == 3
    with pytest.raises(HfHubHTTPError) as err:
        list(api.list_models(author="lst", num_parameters="min:1B"))
    assert err.value.response.status_code == 400 and "filter 'num_parameters' is not supported" in str(err.value)
    r = httpx.get(f"{registry.url}/api/models", params={"sort": "stars"})
    assert r.status_code == 400 and "sort='stars'" in r.json()["error"]

    r = httpx.get(f"{registry.url}/api/no-such-thing")
    assert r.status_code == 404 and r.json()["error"] == "GET /api/no-such-thing: no such endpoint on this registry"
    assert r.headers["x-error-message"] == r.json()["error"]
    r = httpx.delete(f"{registry.url}/api/models")
    assert r.status_code == 405 and "method DELETE is not allowed" in r.json()["error"]


def test_a_blob_missing_from_storage_is_a_500_naming_the_file(registry):
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/lost")
    data = b"soon gone\n"
    api.upload_file(path_or_fileobj=data, path_in_repo="lost.txt", repo_id="acme/lost")
    path = blob_path(registry.blobs, hashlib.sha256(data).hexdigest())
    path.chmod(0o644)
    path.unlink()
    for method in ("HEAD", "GET"):
        r = httpx.request(method, f"{registry.url}/acme/lost/resolve/main/lost.txt")
        assert r.status_code == 500, method
        assert "stored bytes of 'lost.txt'" in r.headers["x-error-message"] and "missing" in r.headers[
            "x-error-message"]
    assert "Traceback" not in registry.log.read_text(errors="replace")


def test_an_unreachable_database_is_503_on_health_and_every_route(tmp_path):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker
    from starlette.testclient import TestClient

    from expertmix.server.registry import RegistrySettings, create_app

    app = create_app(RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}", blobs_url=str(tmp_path / "b")))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/health").status_code == 200
        gone = create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'r.db'}")  # cannot be opened
        app.state.registry.sessions = sessionmaker(gone)
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "database unavailable"
        for path in ("/api/models", "/api/models/acme/x", "/api/experts"):
            r = client.get(path)
            assert r.status_code == 503 and r.json()["error"].startswith("database unavailable"), path
            assert r.headers["retry-after"]


def test_an_unwritable_blob_folder_or_a_non_http_public_url_stops_serve_in_one_line(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "sha256").write_text("a file where the blob folder should be")
    env = {"EXPERTMIX_HOME": str(tmp_path / "home")}
    db = f"sqlite:///{tmp_path / 'r.db'}"
    proc = cli("serve", "--port", "1", "--database", db, "--blobs", str(blobs), env=env, check=False)
    assert proc.returncode == 1 and f"the blob folder {blobs / 'sha256'} is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("serve", "--port", "1", "--database", db, "--public-url", "registry.example.org", env=env,
               check=False)
    assert proc.returncode == 1 and "public_url" in proc.stderr and "not an http:// or https:// URL" in proc.stderr
    assert "Traceback" not in proc.stderr
