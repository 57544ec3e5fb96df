"""The local store: immutable revisions, refs, integrity, and nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from expertmix.errors import CardError, StoreError
from expertmix.hub.card import DataInfo, EmbeddingInfo, ExpertCard, ExpertInfo
from expertmix.hub.repo import save_domain_embedding
from expertmix.hub.store import LocalStore


def make_expert(folder, seed_dir, name="org/toy", domain="toy"):
    shutil.copytree(seed_dir, folder)
    save_domain_embedding(folder, torch.ones(4), "seed", 3)
    info = ExpertInfo(name=name, domain=domain, languages=["en"], kind="dense", base_model="tiny",
                      base_fingerprint="a" * 64, architecture="llama(x)", tokenizer_fingerprint="b" * 64,
                      embedding=EmbeddingInfo(model="seed", dim=4, documents=3), data=DataInfo(documents=3, tokens=9))
    ExpertCard(expert=info).save(folder)
    return folder


def test_revisions_are_immutable_and_resolvable_by_prefix_and_tag(tmp_path, llama_seed):
    store = LocalStore(tmp_path / "store")
    folder = make_expert(tmp_path / "e", llama_seed)
    first = store.publish(folder, tag="v1")
    (folder / "notes.md").write_text("changed")
    second = store.publish(folder)
    assert first.revision != second.revision
    assert store.show("org/toy").revision == second.revision
    assert store.show("org/toy@v1").revision == first.revision
    assert store.show(f"org/toy@{first.revision[:8]}").revision == first.revision
    assert not (store.pull("org/toy@v1") / "notes.md").exists()
    assert (store.pull("org/toy") / "notes.md").read_text() == "changed"
    assert store.revisions("org/toy") == [first.revision, second.revision]
    with pytest.raises(StoreError, match="'nope' is not a revision or tag of expert 'org/toy'"):
        store.show("org/toy@nope")
    with pytest.raises(StoreError, match="no expert named 'org/other'"):
        store.show("org/other")
    with pytest.raises(StoreError, match="'bad rev' is not a revision or tag"):
        store.show("org/toy@bad rev")


def test_tags_do_not_move_and_a_bad_tag_publishes_nothing(tmp_path, llama_seed):
    """A tag naming other content, or a malformed one ('a/b' once corrupted the store), is refused before 'main'
    moves; republishing the content a tag already names succeeds (a retried command is harmless)."""
    store = LocalStore(tmp_path / "store")
    folder = make_expert(tmp_path / "e", llama_seed)
    first = store.publish(folder, tag="v1")
    assert store.publish(folder, tag="v1").revision == first.revision  # the same content: a no-op
    (folder / "notes.md").write_text("changed")
    for tag, expected in (("v1", "tag 'v1' already names revision"), ("a/b", "invalid tag 'a/b'"),
                          ("main", "invalid tag 'main'"), (first.revision[:12], "looks like a revision id"),
                          ("deadbeef", "looks like a revision id"), ("V1", "already has the ref 'v1'")):
        with pytest.raises(StoreError, match=expected):
            store.publish(folder, tag=tag)
        assert store.show("org/toy").revision == first.revision  # main did not move
    assert store.show("org/toy@v1").revision == first.revision
    assert [e.name for e in store.list()] == ["org/toy"]
    with pytest.raises(StoreError, match="namespace 'API' is reserved"):  # it could never move to a server
        store.publish(folder, name="API/toy")


def test_a_failed_publish_leaves_nothing_visible_and_can_be_retried(tmp_path, llama_seed, monkeypatch):
    store = LocalStore(tmp_path / "store")
    folder = make_expert(tmp_path / "e", llama_seed)
    real = LocalStore._put_blob
    calls = {"n": 0}

    def dying(self, src):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(self, src)

    monkeypatch.setattr(LocalStore, "_put_blob", dying)
    with pytest.raises(OSError):
        store.publish(folder)
    assert store.list() == []
    monkeypatch.setattr(LocalStore, "_put_blob", real)
    entry = store.publish(folder)
    assert [e.name for e in store.list()] == ["org/toy"] and entry.revision


def test_incomplete_or_unsafe_expert_folders_are_refused(tmp_path, llama_seed):
    store = LocalStore(tmp_path / "store")
    folder = make_expert(tmp_path / "e", llama_seed)
    (folder / "domain_embedding.safetensors").unlink()
    with pytest.raises(StoreError, match="missing domain_embedding.safetensors"):
        store.publish(folder)
    folder = make_expert(tmp_path / "f", llama_seed)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(StoreError, match="pickled weight files are refused"):
        store.publish(folder)
    folder = make_expert(tmp_path / "g", llama_seed)
    text = (folder / "README.md").read_text().replace("kind: dense", "kind: huge")
    (folder / "README.md").write_text(text)
    with pytest.raises(CardError, match="field 'expert.kind'"):
        store.publish(folder)
    assert store.list() == []


def test_a_corrupted_blob_is_detected_on_pull(tmp_path, llama_seed):
    store = LocalStore(tmp_path / "store")
    entry = store.publish(make_expert(tmp_path / "e", llama_seed))
    cfg = next(f for f in entry.files if f.path == "config.json")
    blob = store._blob(cfg.sha256)
    blob.chmod(0o644)
    blob.write_text(json.dumps({"tampered": True}))
    with pytest.raises(StoreError, match="missing or corrupt"):
        store.pull("org/toy")
    assert not (store.root / "snapshots" / "org" / "toy" / entry.revision).exists()


@pytest.mark.parametrize("name", ["../evil", "org/../x", "/abs", "a/b/c", "", "org/.git"])
def test_unsafe_names_are_refused(tmp_path, llama_seed, name):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(StoreError, match="invalid expert name"):
        store.publish(make_expert(tmp_path / "e", llama_seed), name=name)


def test_an_uppercase_hex_tag_is_a_tag_matched_by_exact_case_and_not_a_commit_prefix(tmp_path, llama_seed):
    """Commit ids are lowercase hex: 'CAFE123' hides none, so it is a fine tag (it was refused as commit-like),
    and the store reads refs by exact case ('cafe123' is no tag of it; 'V1' beside 'v1' is refused, since on
    macOS and Windows the two would be one file)."""
    from click.testing import CliRunner

    from expertmix.cli import main

    store = tmp_path / "store"
    folder = make_expert(tmp_path / "e", llama_seed)
    res = CliRunner().invoke(main, ["publish", str(folder), "--tag", "CAFE123", "--registry", str(store)])
    assert res.exit_code == 0, res.output
    revision = res.output.strip().split("@")[1]
    shown = CliRunner().invoke(main, ["show", "org/toy@CAFE123", "--registry", str(store)])
    assert shown.exit_code == 0 and json.loads(shown.output)["revision"] == revision
    assert json.loads(shown.output)["refs"] == ["CAFE123", "main"]
    lower = CliRunner().invoke(main, ["show", "org/toy@cafe123", "--registry", str(store)])
    assert lower.exit_code == 1 and "'cafe123' is not a revision or tag of expert 'org/toy'" in lower.output
    refused = CliRunner().invoke(main, ["publish", str(folder), "--tag", "cafe1234", "--registry", str(store)])
    assert refused.exit_code == 1 and "invalid tag 'cafe1234': it looks like a revision id" in refused.output
    assert LocalStore(store).resolve(f"org/toy@{revision[:7]}") == ("org/toy", revision)  # prefixes still resolve


def test_written_files_get_the_umask_mode_and_store_blobs_are_read_only(tmp_path, llama_seed):
    """safetensors' save_file writes through a temporary file of its own, which left files written through
    atomic_path 0600 (unreadable by a registry's service account); blobs are read-only, as the umask allows."""
    import os
    import stat

    from expertmix.fsutil import UMASK, write_json_atomic

    save_domain_embedding(tmp_path / "emb", torch.ones(4), "seed", 3)
    write_json_atomic(tmp_path / "emb" / "notes.json", {"a": 1})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "emb").iterdir()}
    assert modes == {"domain_embedding.safetensors": 0o666 & ~UMASK, "notes.json": 0o666 & ~UMASK}
    store = LocalStore(tmp_path / "store")
    entry = store.publish(make_expert(tmp_path / "e", llama_seed))
    blobs = [store._blob(f.sha256) for f in entry.files]
    assert {stat.S_IMODE(b.stat().st_mode) for b in blobs} == {0o444 & ~UMASK}
    assert not any(os.access(b, os.W_OK) for b in blobs) or os.geteuid() == 0  # root writes whatever the mode
