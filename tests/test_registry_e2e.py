"""End to end (issue 4): train experts with ``expertmix train``, publish them to a real registry server
with the CLI, pull on a "second machine" (another EXPERTMIX_HOME), load with transformers, compare files.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner
from registry_helpers import DATABASES, database, plain_http_uploads, serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertmix.cli import main
from expertmix.errors import StoreError
from expertmix.fsutil import sha256_file


def run(args: list[str], env: dict | None = None, ok: bool = True):
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if ok:
        assert res.exit_code == 0, f"expertmix {' '.join(map(str, args))}: {res.output[-3000:]}"
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_seed, corpus) -> dict[str, Path]:
    """Two experts made the way a contributor makes them."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for domain in ("math", "code"):
        out[domain] = root / domain
        run(["train", "--base", llama_seed, "--data", corpus[domain], "--domain", domain, "--out", out[domain],
             "--max-steps", 2, "--batch-size", 4, "--seq-len", 64, "--language", "en"])
    return out


@pytest.fixture(scope="module", params=DATABASES)
def registry(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"registry-e2e-{request.param}")
    with database(request.param, tmp) as db_url, serve(tmp, db_url) as reg:
        yield reg


@pytest.fixture(autouse=True)
def _uploads(monkeypatch, tmp_path):
    plain_http_uploads(monkeypatch, tmp_path / "hf-home")


def files_of(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


def test_train_publish_pull_on_a_second_machine_and_load(registry, trained, tmp_path, llama_seed, corpus):
    writer = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_TOKEN": registry.token("acme"),
              "EXPERTMIX_HOME": str(tmp_path / "machine1")}
    published = run(["publish", trained["math"], "--name", "acme/math", "--tag", "v1"], env=writer).stdout
    assert published.startswith("published acme/math@")
    revision = published.split("@")[1].strip()
    run(["publish", trained["code"], "--name", "acme/code"], env=writer)

    reader = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_TOKEN": "", "EXPERTMIX_HOME": str(tmp_path / "machine2")}
    pulled = Path(run(["pull", "acme/math@v1"], env=reader).stdout.strip().splitlines()[-1])
    assert pulled.is_relative_to(tmp_path / "machine2") and pulled.name == revision
    assert files_of(pulled) == files_of(trained["math"])

    ids = torch.tensor([[1, 5, 9, 12, 40, 2]])
    original = AutoModelForCausalLM.from_pretrained(trained["math"]).eval()
    loaded = AutoModelForCausalLM.from_pretrained(pulled).eval()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, loaded(ids).logits)
    vocab = AutoTokenizer.from_pretrained(trained["math"]).get_vocab()
    assert AutoTokenizer.from_pretrained(pulled).get_vocab() == vocab

    shown = json.loads(run(["show", "acme/math@v1"], env=reader).stdout)
    assert shown["revision"] == revision and "v1" in shown["refs"]
    assert {f["path"]: f["sha256"] for f in shown["files"]} == files_of(trained["math"])
    listed = {e["name"] for e in json.loads(run(["list", "--json"], env=reader).stdout)}
    assert {"acme/math", "acme/code"} <= listed

    found = json.loads(run(["search", "--domain", "code", "--json"], env=reader).stdout)
    assert [e["name"] for e in found] == ["acme/code"]
    assert json.loads(run(["search", "--language", "fr", "--json"], env=reader).stdout) == []
    like = json.loads(run(["search", "--like", corpus["code"], "--base", llama_seed, "--json"], env=reader).stdout)
    assert [e["name"] for e in like][:2] == ["acme/code", "acme/math"]
    assert like[0]["score"] > like[1]["score"]


def test_publishing_without_a_token_is_refused_clearly(registry, trained, tmp_path):
    env = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_TOKEN": "", "EXPERTMIX_HOME": str(tmp_path / "h")}
    res = run(["publish", trained["math"], "--name", "acme/nope"], env=env, ok=False)
    assert res.exit_code == 1 and "401" in res.output and "EXPERTMIX_TOKEN" in res.output
    other = {**env, "EXPERTMIX_TOKEN": registry.token("other")}
    res = run(["publish", trained["math"], "--name", "acme/nope"], env=other, ok=False)
    assert res.exit_code == 1 and "403" in res.output and "'other'" in res.output
    res = run(["pull", "acme/never-published"], env=env, ok=False)
    assert res.exit_code == 1 and "not found" in res.output


def test_private_and_tag_apply_to_an_existing_repo_and_a_bad_tag_publishes_nothing(registry, trained, tmp_path):
    """--private on an existing public repo makes it private (it was ignored); a tag that names other content
    or is malformed is refused before 'main' moves; retrying a finished publish with its tag succeeds."""
    env = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_TOKEN": registry.token("tags"),
           "EXPERTMIX_HOME": str(tmp_path / "h")}
    first = run(["publish", trained["math"], "--name", "tags/m", "--tag", "v1"], env=env).output
    revision = first.strip().split("@")[1]
    assert run(["publish", trained["math"], "--name", "tags/m", "--tag", "v1"], env=env).output.strip().endswith(
        revision)
    for tag, expected in (("v1", "tag 'v1' already names revision"), ("a/b", "invalid tag 'a/b'")):
        res = run(["publish", trained["code"], "--name", "tags/m", "--tag", tag], env=env, ok=False)
        assert res.exit_code == 1 and expected in res.output, res.output
        assert json.loads(run(["show", "tags/m"], env=env).output)["revision"] == revision  # main did not move
    run(["publish", trained["code"], "--name", "tags/m", "--private"], env=env)
    anonymous = {**env, "EXPERTMIX_TOKEN": ""}
    res = run(["show", "tags/m"], env=anonymous, ok=False)
    assert res.exit_code == 1 and "not found" in res.output


def test_search_like_works_on_the_local_store_too(trained, tmp_path, llama_seed, corpus, home):
    run(["publish", trained["math"], "--name", "acme/math"])
    run(["publish", trained["code"], "--name", "acme/code"])
    like = json.loads(run(["search", "--like", corpus["math"], "--base", llama_seed, "--json"]).stdout)
    assert [e["name"] for e in like] == ["acme/math", "acme/code"]
    res = run(["search", "--like", corpus["math"]], ok=False)
    assert res.exit_code == 1 and "--base" in res.output


def test_private_experts_are_listed_only_with_their_namespace_token(registry, trained, tmp_path):
    owner = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_TOKEN": registry.token("acme"),
             "EXPERTMIX_HOME": str(tmp_path / "h")}
    run(["publish", trained["code"], "--name", "acme/hidden", "--private"], env=owner)
    anonymous = {**owner, "EXPERTMIX_TOKEN": ""}
    assert "acme/hidden" not in {e["name"] for e in json.loads(run(["list", "--json"], env=anonymous).stdout)}
    assert "acme/hidden" in {e["name"] for e in json.loads(run(["list", "--json"], env=owner).stdout)}
    assert run(["pull", "acme/hidden"], env=anonymous, ok=False).exit_code == 1
    assert Path(run(["pull", "acme/hidden"], env=owner).stdout.strip().splitlines()[-1]).is_dir()
    res = run(["publish", trained["code"], "--name", "acme/x", "--private"], env={"EXPERTMIX_REGISTRY": ""},
              ok=False)
    assert res.exit_code == 2 and "--private needs a registry server" in res.output


def test_search_filters_mean_the_same_on_the_local_store_and_the_server(registry, trained, tmp_path):
    """An uppercase fingerprint prefix finds the same experts in both; a non-hex one and --limit 0 are refused
    by name for both (the server said 400 and the local store returned nothing, or everything)."""
    server = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_TOKEN": registry.token("acme"),
              "EXPERTMIX_HOME": str(tmp_path / "h")}
    local = {"EXPERTMIX_REGISTRY": "", "EXPERTMIX_HOME": str(tmp_path / "local")}
    for env in (server, local):
        run(["publish", trained["math"], "--name", "acme/fp-math"], env=env)
    fingerprint = json.loads(run(["show", "acme/fp-math"], env=local).stdout)["base_fingerprint"]
    found = {}
    for label, env in (("server", server), ("local", local)):
        hits = json.loads(run(["search", "--base-fingerprint", fingerprint[:8].upper(), "--json"], env=env).stdout)
        found[label] = {e["name"] for e in hits}
        for bad, hint in ((["--base-fingerprint", "xyz"], "'xyz' is not a hex fingerprint"),
                          (["--base-fingerprint", ""], "'' is not a hex fingerprint"),
                          (["--base-fingerprint", "a" * 65], "at most 64 digits"),
                          (["--limit", "0"], "0 is not in the range x>=1")):
            res = run(["search", *bad], env=env, ok=False)
            assert res.exit_code == 2 and hint in res.output, (label, res.output)
    assert "acme/fp-math" in found["local"] and found["local"] <= found["server"]


def test_a_local_name_cannot_be_both_an_expert_and_a_namespace(trained, home):
    """'qa' and 'qa/refs' once shared folders in the local store and broke `list` for every expert."""
    run(["publish", trained["math"], "--name", "qa"])
    res = run(["publish", trained["code"], "--name", "qa/refs"], ok=False)
    assert res.exit_code == 1 and "'qa' is already an expert there" in res.output
    res = run(["publish", trained["code"], "--name", "QA/refs"], ok=False)  # one folder on macOS and Windows
    assert res.exit_code == 1 and "'qa' is already an expert there" in res.output
    run(["publish", trained["code"], "--name", "team/code"])
    for name in ("team", "Team"):
        res = run(["publish", trained["math"], "--name", name], ok=False)
        assert res.exit_code == 1 and "it is the namespace of team/code" in res.output
    res = run(["publish", trained["math"], "--name", "Team/Code"], ok=False)
    assert res.exit_code == 1 and "differ only in case" in " ".join(res.output.split())
    assert {e["name"] for e in json.loads(run(["list", "--json"]).stdout)} == {"qa", "team/code"}


def test_a_failed_publish_leaves_no_repo_and_a_tag_taken_meanwhile_is_named(registry, trained, tmp_path,
                                                                            monkeypatch):
    """A publish refused mid-way (here: an upload the server refuses) removes the repo it created, so nothing empty
    is listed; when another publish takes the tag between this one's commit and its tag, the error says where
    the files are."""
    from expertmix.hub.remote import RemoteRegistry

    env = {"EXPERTMIX_REGISTRY": registry.url, "EXPERTMIX_TOKEN": registry.token("acme"),
           "EXPERTMIX_HOME": str(tmp_path / "h")}
    folder = tmp_path / "bad"
    shutil.copytree(trained["math"], folder)
    # the server refuses a pickle whatever its name; the client's own checks go by names
    (folder / "state.dat").write_bytes(pickle.dumps({"w": [OrderedDict(a=i) for i in range(60)]}, protocol=0))
    res = run(["publish", folder, "--name", "acme/refused"], env=env, ok=False)
    assert res.exit_code == 1 and "content is a Python pickle" in " ".join(res.output.split()), res.output
    assert httpx.get(f"{registry.url}/api/models/acme/refused").status_code == 404

    mine, theirs = (RemoteRegistry(registry.url, token=registry.token("acme"), cache_dir=tmp_path / d)
                    for d in ("c1", "c2"))
    real = mine.api.create_tag

    def raced(repo_id, *, tag, revision, exist_ok):  # another contributor's publish lands first, with the tag
        theirs.publish(trained["code"], name=repo_id, tag=tag)
        return real(repo_id, tag=tag, revision=revision, exist_ok=exist_ok)

    monkeypatch.setattr(mine.api, "create_tag", raced)
    with pytest.raises(StoreError) as err:
        mine.publish(trained["math"], name="acme/raced", tag="rel")
    assert "the files are on main as revision" in str(err.value) and "another publish took tag 'rel'" in str(err.value)


def test_a_server_with_another_public_url_is_named_not_a_traceback(trained, tmp_path):
    with database("sqlite", tmp_path) as db_url, \
            serve(tmp_path, db_url, env={"EXPERTMIX_REGISTRY_PUBLIC_URL": "http://example.invalid:9"}) as reg:
        env = {"EXPERTMIX_REGISTRY": reg.url, "EXPERTMIX_TOKEN": reg.token("acme"),
               "EXPERTMIX_HOME": str(tmp_path / "h")}
        res = run(["publish", trained["math"], "--name", "acme/m"], env=env, ok=False)
        message = " ".join(res.output.split())
        assert res.exit_code == 1 and "another --public-url" in message and "Traceback" not in res.output
        assert httpx.get(f"{reg.url}/api/models/acme/m").status_code == 404  # the repo it made is gone
