"""A real federation on loopback, driven like a user drives it: ``expertmix federate`` starts a SuperLink and three
SuperNodes (disjoint shards of different sizes) and runs two rounds. During round 1 one node's machine dies
(SIGKILL of its SuperNode and everything under it); its owner starts the node again, as they would, and it
rejoins for round 2. One federation serves all checks below: it costs minutes on two cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import write_jsonl
from safetensors import safe_open

from expertmix.client.weights import load_state
from expertmix.hub.card import read_card
from expertmix.hub.repo import load_domain_embedding
from expertmix.hub.store import LocalStore
from expertmix.server.local_federation import free_port

SHARDS = {"n0": (0, 8), "n1": (8, 26), "n2": (26, 57)}  # disjoint, sizes far enough apart for distinct batches
VICTIM = "n2"
TIMEOUT = 600


def _wait(cond, what: str, proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (value := cond()) is not None:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"expertmix federate exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    victims = [root, *root.children(recursive=True)]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


@pytest.fixture(scope="module")
def federation(llama_seed, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    lines = [json.loads(line)["text"] for line in corpus["prose"].read_text().splitlines()]
    shards = {n: write_jsonl(root / "data" / f"{n}.jsonl", lines[a:b], language="en") for n, (a, b) in SHARDS.items()}
    work, debug, store = root / "work", root / "sent", root / "store"
    env = {**os.environ, "EXPERTMIX_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("EXPERTMIX_REGISTRY", None)
    argv = [sys.executable, "-m", "expertmix", "federate", "--base", str(llama_seed), "--domain", "prose",
            *[a for n, p in shards.items() for a in ("--node", f"{n}={p}")], "--work-dir", str(work),
            "--rounds", "2", "--local-steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "2e-3",
            "--evaluate-every", "2", "--min-nodes", "2", "--registry", str(store), "--debug-dir", str(debug)]
    log = root / "federate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    restarted = None
    try:
        processes = _wait(lambda: json.loads((work / "processes.json").read_text())
                          if (work / "processes.json").is_file() else None, "the nodes to start", proc, log)
        victim = processes[f"node-{VICTIM}"]["pid"]
        # (before round 1 each node is asked for its data size; the victim dies once it has started training)
        _wait(lambda: True if (debug / VICTIM / "round-0001.started").is_file() else None,
              f"{VICTIM} to start working on round 1", proc, log)
        _kill_tree(victim)
        # The node's owner brings it back: the same node config, the coordinator's address.
        address = (work / "flower" / "config.toml").read_text().split('address = "')[1].split('"')[0]
        with open(root / "restarted.log", "wb") as out:
            restarted = subprocess.Popen(
                [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink", address,
                 "--port", str(free_port()), "--node-config", str(work / "nodes" / f"{VICTIM}.toml")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**env, "FLWR_HOME": str(work / "flower"), "FLWR_TELEMETRY_ENABLED": "0",
                     "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
        if restarted is not None:
            _kill_tree(restarted.pid)
    return {"rc": rc, "log": log.read_text(), "work": work, "debug": debug, "store": store, "seed": llama_seed,
            "state": json.loads((work / "state.json").read_text()),
            "result": json.loads((work / "result.json").read_text()) if (work / "result.json").is_file() else None}


def test_federation_finishes_when_a_node_dies_mid_round_and_the_node_rejoins(federation):
    assert federation["rc"] == 0, federation["log"]
    history = federation["state"]["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert sorted(r["name"] for r in history[0]["nodes"]) == ["n0", "n1"]  # the dead node's update never came
    # It never replied, so the coordinator knows it by its node id only; the SuperLink saw its heartbeat stop.
    assert history[0]["sampled"] == 3 and len(history[0]["errors"]) == 1, history[0]["errors"]
    assert "heartbeat" in history[0]["errors"][0]
    # The command's own output says so as the round ends, not only the coordinator's log file.
    assert f"round 1: {history[0]['errors'][0]}; continuing with the other nodes" in federation["log"]
    assert sorted(r["name"] for r in history[1]["nodes"]) == ["n0", "n1", "n2"]  # it came back and rejoined
    assert "published prose@" in federation["log"]
    # output to a file shows no progress bar: each round still gets its line
    assert "round 1/2 done: 2 node(s)" in federation["log"] and "round 2/2 done: 3 node(s)" in federation["log"]
    # no node's optimizer moments outlive the federation (they weigh twice the weights)
    assert not list((federation["work"] / "cache" / "optimizer").glob("*.safetensors"))


def _sent(debug: Path, name: str, rnd: int) -> tuple[float, dict[str, torch.Tensor]]:
    path = debug / name / f"round-{rnd:04d}.safetensors"
    with safe_open(str(path), "pt") as f:
        weight = float(f.metadata()["num-examples"])
    return weight, load_state(path)


def test_aggregate_is_the_example_weighted_mean_of_what_the_nodes_sent(federation):
    for h in federation["state"]["history"]:
        names = [r["name"] for r in h["nodes"]]
        sends = [_sent(federation["debug"], n, h["round"]) for n in names]
        weights = [w for w, _ in sends]
        assert len(set(weights)) == len(weights)  # shards of different sizes, batches split by them: it matters
        assert weights == [r["num_examples"] for r in h["nodes"]] == [4 * r["batch_size"] for r in h["nodes"]]
        total = sum(weights)
        aggregate = load_state(federation["work"] / "checkpoints" / f"round-{h['round']:04d}.safetensors")
        assert set(aggregate) == set(sends[0][1])
        for k, v in aggregate.items():
            expected = sum(w / total * s[k].double() for w, s in sends)
            torch.testing.assert_close(v.double(), expected, atol=1e-6, rtol=1e-5)
        a, b = sends[0][1], sends[1][1]
        assert any(not torch.equal(a[k], b[k]) for k in a)  # nodes sent different weights


def test_published_expert_loads_with_transformers(federation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = LocalStore(federation["store"]).pull(federation["result"]["published"])
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    final = load_state(federation["work"] / "checkpoints" / "round-0002.safetensors")
    params = dict(model.named_parameters())
    for k, v in final.items():
        torch.testing.assert_close(params[k].detach().float(), v)
    logits = model(**tok("the cat sat on a mat", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_card_records_the_federation(federation):
    assert federation["result"]["expert"] == "expert"  # relative to the work folder: a moved one still finds it
    folder = federation["work"] / federation["result"]["expert"]
    expert = read_card(folder).expert
    fed = expert.federation
    assert fed["rounds"] == 2 and fed["nodes"] == 3 and fed["strategy"] == "fedavg"
    history = federation["state"]["history"]
    assert fed["examples_per_node"] == {n: sum(r["num_examples"] for h in history for r in h["nodes"] if r["name"] == n)
                                        for n in ("n0", "n1", "n2")}
    assert [sorted(r["nodes"]) for r in fed["rounds_log"]] == [["n0", "n1"], ["n0", "n1", "n2"]]
    assert fed["batch_split"] == "by-data" and sum(fed["batch_per_node"].values()) == 4 * 3  # round 2's split
    assert fed["batch_per_node"]["n0"] < fed["batch_per_node"]["n1"] < fed["batch_per_node"]["n2"]
    nodes = federation["state"]["nodes"]
    assert expert.data.documents == sum(s["documents"] for s in nodes.values())
    assert "valid_perplexity_before" in expert.metrics and "valid_perplexity_after" in expert.metrics
    assert expert.metrics["valid_perplexity_after"] < expert.metrics["valid_perplexity_before"]
    # The domain embedding is the document-weighted mean of the nodes' embeddings (no text left a node).
    docs = torch.tensor([float(s["documents"]) for s in nodes.values()])
    vectors = torch.tensor([s["embedding"] for s in nodes.values()])
    torch.testing.assert_close(load_domain_embedding(folder), (docs[:, None] * vectors).sum(0) / docs.sum())


def test_no_federation_process_is_left_running(federation):
    work = str(federation["work"])
    leftovers = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.info["environ"] or {}
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if ("flwr" in cmd or "flower" in cmd) and (work in cmd or env.get("FLWR_HOME", "").startswith(work)):
            leftovers.append(cmd)
    assert not leftovers
