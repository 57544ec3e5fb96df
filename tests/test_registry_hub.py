"""The registry server driven by the stock huggingface_hub client and the expert endpoints (issue 4).

One real ``expertmix serve`` process per database (SQLite always, PostgreSQL when
EXPERTMIX_TEST_POSTGRES_URL is set) on a free loopback port; the tests talk to it over HTTP only.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from huggingface_hub import CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import BlobLfsInfo
from registry_helpers import DATABASES, database, make_expert, plain_http_uploads, serve

from expertmix.errors import StoreError
from expertmix.fsutil import sha256_file
from expertmix.hub.remote import RemoteRegistry


@pytest.fixture(scope="module", params=DATABASES)
def registry(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"registry-{request.param}")
    # A small tree page size makes snapshot_download follow the Link pagination.
    with database(request.param, tmp) as db_url, serve(tmp, db_url,
                                                       env={"EXPERTMIX_REGISTRY_TREE_PAGE_SIZE": "3"}) as reg:
        yield reg


@pytest.fixture(scope="module")
def experts(tmp_path_factory, llama_seed):
    root = tmp_path_factory.mktemp("experts")
    e = torch.eye(64)
    return {
        "math": make_expert(root / "math", llama_seed, "math", "math", e[0] + e[1] / 10, ("en",)),
        "code": make_expert(root / "code", llama_seed, "code", "code", e[2] + e[1] / 10, ("en", "de")),
    }


@pytest.fixture(autouse=True)
def _uploads(monkeypatch, tmp_path):
    plain_http_uploads(monkeypatch, tmp_path / "hf-home")


def _local_files(folder) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


def test_hub_client_creates_uploads_lists_and_downloads_by_commit_and_tag(registry, experts, tmp_path):
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    folder = experts["math"]
    api.create_repo("acme/math-hub")
    first = api.upload_folder(folder_path=folder, repo_id="acme/math-hub", commit_message="first")
    assert re.fullmatch(r"[0-9a-f]{40}", first.oid)

    info = api.model_info("acme/math-hub", files_metadata=True)
    local = _local_files(folder)
    assert info.sha == first.oid
    assert {s.rfilename: s.size for s in info.siblings} == {k: (folder / k).stat().st_size for k in local}
    assert info.expert["domain"] == "math" and "domain:math" in info.tags
    assert sorted(api.list_repo_files("acme/math-hub")) == sorted(local)
    weights = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    assert weights.lfs.sha256 == local["model.safetensors"]

    api.create_tag("acme/math-hub", tag="v1", revision=first.oid)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "NOTES.md").write_text("second revision\n")
    second = api.upload_folder(folder_path=tmp_path / "extra", repo_id="acme/math-hub", commit_message="2")
    assert second.oid != first.oid
    assert "NOTES.md" in api.list_repo_files("acme/math-hub")
    assert "NOTES.md" not in api.list_repo_files("acme/math-hub", revision="v1")
    assert [c.commit_id for c in api.list_repo_commits("acme/math-hub")][:2] == [second.oid, first.oid]

    # A second machine: fresh cache, anonymous, by tag (snapshot) and by commit id (single file).
    snap = snapshot_download("acme/math-hub", revision="v1", endpoint=registry.url, cache_dir=tmp_path / "c1",
                             token=False)
    assert _local_files(snap) == local
    one = hf_hub_download("acme/math-hub", "config.json", revision=first.oid, endpoint=registry.url,
                          cache_dir=tmp_path / "c2", token=False)
    assert sha256_file(one) == local["config.json"]
    latest = snapshot_download("acme/math-hub", endpoint=registry.url, cache_dir=tmp_path / "c3", token=False)
    assert sha256_file(f"{latest}/NOTES.md") == sha256_file(tmp_path / "extra" / "NOTES.md")

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/math-hub", "config.json", revision="v9", endpoint=registry.url,
                        cache_dir=tmp_path / "c4", token=False)


def test_hub_client_branches_take_commits_of_their_own_and_main_stays(registry, experts, tmp_path):
    """create_branch / upload to it / read by it / delete_branch, as the Hub does (it was a bare 404)."""
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/branchy")
    first = api.upload_folder(folder_path=experts["math"], repo_id="acme/branchy", commit_message="first")
    api.create_branch("acme/branchy", branch="dev")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "NOTES.md").write_text("work in progress\n")
    on_dev = api.upload_folder(folder_path=tmp_path / "extra", repo_id="acme/branchy", revision="dev",
                               commit_message="wip")
    assert api.model_info("acme/branchy").sha == first.oid  # main did not move
    assert api.model_info("acme/branchy", revision="dev").sha == on_dev.oid
    assert "NOTES.md" in api.list_repo_files("acme/branchy", revision="dev")
    assert "NOTES.md" not in api.list_repo_files("acme/branchy")
    got = hf_hub_download("acme/branchy", "NOTES.md", revision="dev", endpoint=registry.url,
                          cache_dir=tmp_path / "c", token=False)
    assert Path(got).read_text() == "work in progress\n"
    refs = api.list_repo_refs("acme/branchy")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": first.oid, "dev": on_dev.oid}

    api.create_branch("acme/branchy", branch="from-first", revision=first.oid[:12])
    assert api.model_info("acme/branchy", revision="from-first").sha == first.oid
    api.create_branch("acme/branchy", branch="dev", exist_ok=True)
    # commit-id-like names (a branch would shadow the commits they name) and '/' are refused with a reason
    for bad, status in (("dev", 409), (first.oid, 400), (first.oid[:7], 400), ("feature/x", 400)):
        with pytest.raises(HfHubHTTPError) as err:
            api.create_branch("acme/branchy", branch=bad)
        assert err.value.response.status_code == status and err.value.response.headers.get("x-error-message")
    for bad in (first.oid, first.oid[:7], "deadbeef", "rel/1"):  # tags alike: one named like a commit would hide it
        with pytest.raises(HfHubHTTPError) as err:
            api.create_tag("acme/branchy", tag=bad, revision=on_dev.oid)
        assert err.value.response.status_code == 400, bad
    assert api.model_info("acme/branchy", revision=first.oid[:7]).sha == first.oid
    # commit ids are lowercase hex and refs match by exact case: an uppercase one hides no commit, so it may be a ref
    api.create_tag("acme/branchy", tag="CAFE1234", revision=on_dev.oid)
    assert api.model_info("acme/branchy", revision="CAFE1234").sha == on_dev.oid
    with pytest.raises(HfHubHTTPError) as err:  # another namespace's token cannot branch acme's repo
        HfApi(endpoint=registry.url, token=registry.token("other")).create_branch("acme/branchy", branch="x")
    assert err.value.response.status_code == 403
    api.delete_branch("acme/branchy", branch="dev")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/branchy", revision="dev")
    assert api.model_info("acme/branchy", revision=on_dev.oid).sha == on_dev.oid  # its commit stays readable
    with pytest.raises(HfHubHTTPError) as err:
        api.delete_branch("acme/branchy", branch="main")
    assert err.value.response.status_code == 403


def test_concurrent_commits_without_a_parent_all_land_and_a_stale_parent_is_412(registry):
    """The stock client sends no parentCommit: like the Hub, the server applies each commit on the head it finds
    (it used to refuse most concurrent uploads with 409). A commit that names a parent no longer at the head is
    refused."""
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/busy")
    start = api.model_info("acme/busy").sha

    def upload(i: int) -> str:
        return api.upload_file(path_or_fileobj=f"file {i}\n".encode(), path_in_repo=f"f{i}.txt",
                               repo_id="acme/busy").oid

    with ThreadPoolExecutor(8) as pool:
        oids = list(pool.map(upload, range(8)))
    assert sorted(api.list_repo_files("acme/busy")) == sorted(f"f{i}.txt" for i in range(8))
    assert len(set(oids)) == 8 and len(api.list_repo_commits("acme/busy")) == 9
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"late\n", path_in_repo="late.txt", repo_id="acme/busy", parent_commit=start)
    assert err.value.response.status_code == 412


def test_hub_client_deletes_files_and_folders_marked_by_a_trailing_slash(registry, tmp_path):
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/pruned")
    for rel in ("keep.txt", "gone.txt", "sub dir/a.txt", "sub dir/deep/b.txt", "other/c.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    api.upload_folder(folder_path=tmp_path, repo_id="acme/pruned")
    api.create_commit("acme/pruned", [CommitOperationDelete("sub dir/"), CommitOperationDelete("gone.txt")],
                      commit_message="prune")
    assert sorted(api.list_repo_files("acme/pruned")) == ["keep.txt", "other/c.txt"]
    api.delete_folder("other", repo_id="acme/pruned")
    assert api.list_repo_files("acme/pruned") == ["keep.txt"]


def test_downloads_send_commit_sha256_etag_size_and_honour_range(registry, experts):
    api = HfApi(endpoint=registry.url, token=registry.token("acme"))
    api.create_repo("acme/ranges")
    commit = api.upload_folder(folder_path=experts["math"], repo_id="acme/ranges", commit_message="up").oid
    path = experts["math"] / "model.safetensors"
    data = path.read_bytes()
    url = f"{registry.url}/acme/ranges/resolve/main/model.safetensors"
    with httpx.Client() as http:
        head = http.head(url)
        assert head.status_code == 200
        assert head.headers["x-repo-commit"] == commit
        assert head.headers["etag"].strip('"') == sha256_file(path)
        assert head.headers["x-linked-etag"].strip('"') == sha256_file(path)
        assert int(head.headers["x-linked-size"]) == int(head.headers["content-length"]) == len(data)
        assert "x-xet-hash" not in head.headers
        whole = http.get(url)
        assert whole.status_code == 200 and whole.content == data and "content-encoding" not in whole.headers
        part = http.get(url, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == data[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
        tail = http.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
        resume = http.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
        assert resume.content == data[-5:]
        past = http.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
        for ignored in ("items=0-1", "bytes=5-2", "bytes=abc", "bytes=0-1,5-9"):  # RFC 9110: the whole file
            whole = http.get(url, headers={"Range": ignored})
            assert whole.status_code == 200 and whole.content == data, ignored
        missing = http.head(f"{registry.url}/acme/ranges/resolve/main/nope.json")
        assert missing.status_code == 404 and missing.headers["x-error-code"] == "EntryNotFound"
        assert missing.headers["x-repo-commit"] == commit


def test_private_repos_are_invisible_without_a_token_for_their_namespace(registry, experts, tmp_path):
    owner = HfApi(endpoint=registry.url, token=registry.token("acme"))
    owner.create_repo("acme/secret", private=True)
    owner.upload_folder(folder_path=experts["code"], repo_id="acme/secret", commit_message="hidden")
    assert owner.model_info("acme/secret").private is True
    for token in (False, registry.token("other")):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=registry.url, token=token).model_info("acme/secret")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("acme/secret", "config.json", endpoint=registry.url, cache_dir=tmp_path / "c",
                            token=token)
    anonymous = httpx.get(f"{registry.url}/api/experts", params={"domain": "code"}).json()
    assert "acme/secret" not in {e["id"] for e in anonymous}
    mine = httpx.get(f"{registry.url}/api/experts", params={"domain": "code"},
                     headers={"authorization": f"Bearer {registry.token('acme')}"}).json()
    assert "acme/secret" in {e["id"] for e in mine}


def test_expert_endpoints_search_fields_similarity_and_card_json(registry, experts):
    remote = RemoteRegistry(registry.url, token=registry.token("lab"))
    math = remote.publish(experts["math"], name="lab/math")
    code = remote.publish(experts["code"], name="code", tag="v1")  # NAME goes under the token's namespace
    assert code.name == "lab/code" and "v1" in code.refs
    assert remote.publish(experts["math"], name="lab/math").revision == math.revision  # no empty commit

    def names(hits):
        return {e.name for e, _ in hits if e.name.startswith("lab/")}

    assert names(remote.search(domain="code")) == {"lab/code"}
    assert names(remote.search(language="de")) == {"lab/code"}
    assert names(remote.search(kind="dense")) == {"lab/math", "lab/code"}
    fp = math.card.expert.base_fingerprint
    assert names(remote.search(base_fingerprint=fp[:12])) == {"lab/math", "lab/code"}
    assert names(remote.search(base_fingerprint="0" * 12)) == set()
    query = torch.eye(64)[2]
    ranked = [(e.name, s) for e, s in remote.search(like=query, limit=50) if e.name.startswith("lab/")]
    assert [n for n, _ in ranked] == ["lab/code", "lab/math"] and ranked[0][1] > ranked[1][1]

    card = httpx.get(f"{registry.url}/api/experts/lab/code", params={"revision": "v1"}).json()
    assert card["domain"] == "code" and card["languages"] == ["en", "de"] and card["kind"] == "dense"
    assert card["card"]["expert"]["embedding"]["dim"] == 64
    files = {f["path"]: f["sha256"] for f in card["files"]}
    assert files == _local_files(experts["code"])
    shown = remote.show("lab/math")
    assert shown.card.expert == math.card.expert
    assert {e.name for e in remote.list()} >= {"lab/math", "lab/code"}

    # the stock client: list_models filters by tags and searches by substring; card_data is the README's metadata
    api = HfApi(endpoint=registry.url)
    assert {m.id for m in api.list_models(filter="domain:code", author="lab")} == {"lab/code"}
    assert {m.id for m in api.list_models(filter=["kind:dense", "expertmix"], author="lab")} == {"lab/code",
                                                                                                 "lab/math"}
    assert {m.id for m in api.list_models(search="ma", author="lab")} == {"lab/math"}
    assert list(api.list_models(search="%")) == [] and list(api.list_models(search="_")) == []
    data = api.model_info("lab/code").card_data
    assert data.library_name == "transformers" and "domain:code" in data.tags and data.language == ["en", "de"]
    assert data.expert["domain"] == "code" and data.base_model_relation == "finetune"


def test_blobs_on_an_fsspec_url(tmp_path, experts):
    with database("sqlite", tmp_path) as db_url, serve(tmp_path, db_url, blobs="memory://emx-blobs") as reg:
        remote = RemoteRegistry(reg.url, token=reg.token("acme"), cache_dir=tmp_path / "cache")
        entry = remote.publish(experts["math"], name="acme/mem")
        assert httpx.get(f"{reg.url}/health").json()["blobs"] == "memory://emx-blobs"
        pulled = remote.pull(f"acme/mem@{entry.revision}")
        assert _local_files(pulled) == _local_files(experts["math"])
        assert not (tmp_path / "blobs").exists()


def test_pull_verifies_every_file_and_leaves_no_partial_snapshot(registry, experts, tmp_path, monkeypatch):
    remote = RemoteRegistry(registry.url, token=registry.token("acme"), cache_dir=tmp_path / "cache")
    entry = remote.publish(experts["math"], name="acme/tamper")
    honest = remote.api.list_repo_tree

    def lying_tree(*args, **kwargs):  # a tree that disagrees with the bytes, as a tampered transfer would
        for f in honest(*args, **kwargs):
            if f.path == "model.safetensors":
                f.lfs = BlobLfsInfo(size=f.lfs.size, sha256="0" * 64, pointer_size=f.lfs.pointer_size)
            yield f

    monkeypatch.setattr(remote.api, "list_repo_tree", lying_tree)
    with pytest.raises(StoreError, match="model.safetensors"):
        remote.pull("acme/tamper")
    snap = tmp_path / "cache" / "acme" / "tamper" / entry.revision
    assert not snap.exists() and not list((tmp_path / "cache" / "acme" / "tamper").iterdir())
    monkeypatch.undo()
    assert remote.pull("acme/tamper") == snap and _local_files(snap) == _local_files(experts["math"])
