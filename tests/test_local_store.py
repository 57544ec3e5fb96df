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
                          ("DEADBEEF", "looks like a revision id")):
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
