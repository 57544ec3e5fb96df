"""Federated rounds in one process: the real ServerApp loop (``run_federation``) and the real ClientApp, joined by
a Grid that hands each message to the ClientApp directly. Fast checks of what the process-level test
(test_federated.py) cannot afford to repeat: LoRA, FedProx, DP clipping, resuming, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from expertmix.client.app import app as client_app
from expertmix.client.settings import FederationConfig
from expertmix.client.weights import load_state
from expertmix.errors import ExpertmixError
from expertmix.hub.card import read_card
from expertmix.hub.store import LocalStore
from expertmix.server.federation import run_federation

SIZES = {"n0": (0, 10), "n1": (10, 25), "n2": (25, 45)}  # disjoint shards of different sizes


class InProcessGrid(Grid):
    """Delivers each message to the ClientApp in this process, as a SuperNode would in its own."""

    def __init__(self, run_config: dict, node_configs: list[dict], fail_on_train_call: int | None = None):
        self.run_config, self.nodes = run_config, {i + 1: c for i, c in enumerate(node_configs)}
        self.sent: list[Message] = []
        self.train_calls, self.fail_on_train_call = 0, fail_on_train_call
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_calls += 1
            if self.train_calls == self.fail_on_train_call:
                raise KeyboardInterrupt  # the coordinator is stopped in the middle of the run
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"msg-{len(self.sent)}"
            self.sent.append(m)
            nid = m.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=nid, node_config=self.nodes[nid], state=RecordDict(),
                          run_config=self.run_config)
            try:
                replies.append(client_app(m, ctx))
            except Exception as exc:  # what Flower's ClientApp runtime turns an exception into
                reason = str(type(exc)) + ":<'" + str(exc) + "'>"  # as Flower's runtime writes it
                replies.append(Message(Error(code=0, reason=reason), reply_to=m))
        return replies


@pytest.fixture
def shards(corpus, tmp_path):
    lines = [json.loads(line)["text"] for line in corpus["prose"].read_text().splitlines()]
    return {name: write_jsonl(tmp_path / "shards" / f"{name}.jsonl", lines[a:b], language="en")
            for name, (a, b) in SIZES.items()}


def _setup(tmp_path, seed, shards, home, **overrides):
    values = dict(base=str(seed), domain="prose", work_dir=str(tmp_path / "work"), rounds=2, local_steps=2,
                  batch_size=4, seq_len=32, lr=2e-3, evaluate_every=2, lora_r=4, registry=str(tmp_path / "store"))
    cfg = FederationConfig.from_run_config({**values, **overrides})
    nodes = [{"data": str(p), "name": n, "cache-dir": str(tmp_path / "cache"), "debug-dir": str(tmp_path / "sent")}
             for n, p in shards.items()]
    return cfg, nodes


def _weighted_mean(tmp_path, rnd: int, names) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    sends = []
    for n in names:
        path = tmp_path / "sent" / n / f"round-{rnd:04d}.safetensors"
        with safe_open(str(path), "pt") as f:
            sends.append((float(f.metadata()["num-examples"]), load_state(path)))
    total = sum(w for w, _ in sends)
    return {k: sum(w / total * s[k].double() for w, s in sends) for k in sends[0][1]}


def test_global_batch_is_split_over_the_nodes_by_their_data_and_weighted_by_examples_trained(tmp_path, llama_seed,
                                                                                             shards, home):
    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=2, evaluate_every=0)
    grid = InProcessGrid(cfg.to_flat(), nodes)
    run_federation(grid, cfg)
    kinds = [m.metadata.message_type for m in grid.sent]
    # the coordinator asks each node for its size once, before the first round; it knows them afterwards
    assert kinds[:3] == ["query"] * 3 and kinds.count("query") == 3
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    tokens = {n: s["tokens"] for n, s in state["nodes"].items()}
    assert len(set(tokens.values())) == 3
    for h in state["history"]:
        batch = {r["name"]: r["batch_size"] for r in h["nodes"]}
        assert sum(batch.values()) == cfg.batch_size * 3  # the global batch, split
        assert sorted(batch, key=batch.get) == sorted(tokens, key=tokens.get)  # more data, more of the batch
        assert batch == cfg.node_batches(tokens)
        for r in h["nodes"]:
            assert r["num_examples"] == cfg.local_steps * batch[r["name"]]  # the FedAvg weight: examples trained
        final = load_state(tmp_path / "work" / "checkpoints" / f"round-{h['round']:04d}.safetensors")
        expected = _weighted_mean(tmp_path, h["round"], SIZES)
        for k, v in final.items():
            torch.testing.assert_close(v.double(), expected[k], atol=1e-6, rtol=1e-5)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert {m.content["config"]["batch-size"] for m in sent} == set(cfg.node_batches(tokens).values())


def test_equal_batch_split_gives_every_node_the_batch_size_without_asking(tmp_path, llama_seed, shards, home):
    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=1, evaluate_every=0, batch_split="equal")
    grid = InProcessGrid(cfg.to_flat(), nodes)
    run_federation(grid, cfg)
    assert "query" not in [m.metadata.message_type for m in grid.sent]
    rows = json.loads((tmp_path / "work" / "state.json").read_text())["history"][0]["nodes"]
    assert [r["batch_size"] for r in rows] == [4, 4, 4]
    assert [r["num_examples"] for r in rows] == [cfg.local_steps * 4] * 3


def test_node_batches_split_by_largest_remainder_with_at_least_one_each():
    cfg = FederationConfig(base="seed", domain="d", work_dir="w", batch_size=2)
    assert cfg.node_batches({"a": 50, "b": 30, "c": 20}) == {"a": 3, "b": 2, "c": 1}
    assert cfg.node_batches({"a": 1000, "b": 1, "c": 1}) == {"a": 5, "b": 1, "c": 1}  # no node left out
    assert cfg.node_batches({"a": 10, "b": None}) == {"a": 2, "b": 2}  # an unknown size takes the batch size
    assert cfg.model_copy(update={"batch_split": "equal"}).node_batches({"a": 50, "b": 10}) == {"a": 2, "b": 2}


def test_lora_federation_sends_only_the_adapter_and_publishes_an_adapter(tmp_path, llama_seed, shards, home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, kind="lora")
    result = run_federation(InProcessGrid(cfg.to_flat(), nodes), cfg)

    sent = load_state(tmp_path / "sent" / "n1" / "round-0002.safetensors")
    assert sent and all("lora_" in k for k in sent)
    n_base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(llama_seed).parameters())
    assert sum(v.numel() for v in sent.values()) < n_base / 5
    final = load_state(tmp_path / "work" / "checkpoints" / "round-0002.safetensors")
    expected = _weighted_mean(tmp_path, 2, SIZES)
    for k, v in final.items():
        torch.testing.assert_close(v.double(), expected[k], atol=1e-6, rtol=1e-5)

    folder = LocalStore(tmp_path / "store").pull(result["published"])
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_seed), folder)
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model)
    for k, v in final.items():
        torch.testing.assert_close(loaded[k].float(), v)
    card = read_card(folder).expert
    assert card.kind == "lora" and card.federation["nodes"] == 3
    log = card.federation["rounds_log"]
    assert log[0]["bytes_from_nodes"] < n_base * 4 and [r["round"] for r in log] == [1, 2]


def test_restarted_server_resumes_after_its_last_checkpoint_and_only_with_the_same_settings(tmp_path, llama_seed,
                                                                                            shards, home):
    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=2)
    with pytest.raises(KeyboardInterrupt):
        run_federation(InProcessGrid(cfg.to_flat(), nodes, fail_on_train_call=2), cfg)
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["rounds_done"] == 1 and not (tmp_path / "work" / "result.json").exists()
    after_round_1 = load_state(tmp_path / "work" / "checkpoints" / "round-0001.safetensors")

    other, _ = _setup(tmp_path, llama_seed, shards, home, rounds=2, lr=1e-2)
    with pytest.raises(ExpertmixError, match="other settings"):
        run_federation(InProcessGrid(other.to_flat(), nodes), other)

    grid = InProcessGrid(cfg.to_flat(), nodes)
    result = run_federation(grid, cfg)
    first = next(m for m in grid.sent if m.metadata.message_type == "train")
    assert first.content["config"]["server-round"] == 2  # round 1 was not trained again
    # the nodes keep their optimizer moments under the federation's id, which the restart keeps
    assert first.content["config"]["federation-id"] == state["federation_id"]
    received = first.content["arrays"].to_torch_state_dict()
    for k, v in after_round_1.items():
        torch.testing.assert_close(received[k], v)
    history = json.loads((tmp_path / "work" / "state.json").read_text())["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert read_card(result["expert"]).expert.federation["rounds"] == 2


def test_fedavgm_applies_server_step_and_momentum_across_a_restart(tmp_path, llama_seed, shards, home):
    from transformers import AutoModelForCausalLM

    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=2, strategy="fedavgm", server_lr=2.0,
                        server_momentum=0.5, publish=False)
    with pytest.raises(KeyboardInterrupt):  # the coordinator stops after round 1: its momentum is checkpointed
        run_federation(InProcessGrid(cfg.to_flat(), nodes, fail_on_train_call=2), cfg)
    run_federation(InProcessGrid(cfg.to_flat(), nodes), cfg)

    g0 = {k: v.detach().double() for k, v in AutoModelForCausalLM.from_pretrained(llama_seed).named_parameters()}
    g1 = {k: v.double() for k, v in load_state(tmp_path / "work" / "checkpoints" / "round-0001.safetensors").items()}
    g2 = load_state(tmp_path / "work" / "checkpoints" / "round-0002.safetensors")
    mean1, mean2 = _weighted_mean(tmp_path, 1, SIZES), _weighted_mean(tmp_path, 2, SIZES)
    for k in g2:
        pg1, pg2 = g0[k] - mean1[k], g1[k] - mean2[k]  # pseudo-gradients: old minus averaged
        torch.testing.assert_close(g1[k], g0[k] - 2.0 * pg1, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g2[k].double(), g1[k] - 2.0 * (0.5 * pg1 + pg2), atol=1e-5, rtol=1e-4)


def _update_norm(tmp_path, name: str, seed) -> float:
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(seed).named_parameters())
    sent = load_state(tmp_path / "sent" / name / "round-0001.safetensors")
    return math.sqrt(sum(float(((v - base[k].detach()) ** 2).sum()) for k, v in sent.items()))


def test_fedprox_sends_mu_and_the_proximal_term_keeps_nodes_near_the_global_state(tmp_path, llama_seed, shards,
                                                                                  home):
    norms = {}
    for strategy, mu in (("fedavg", 0.0), ("fedprox", 200.0)):
        run = tmp_path / strategy
        cfg, nodes = _setup(run, llama_seed, shards, home, rounds=1, evaluate_every=1, strategy=strategy,
                            proximal_mu=mu, local_steps=4, publish=False, lr_schedule="constant")
        grid = InProcessGrid(cfg.to_flat(), nodes)
        run_federation(grid, cfg)
        configs = [m.content["config"] for m in grid.sent if m.metadata.message_type == "train"]
        assert all(("proximal-mu" in c) == (strategy == "fedprox") for c in configs)
        norms[strategy] = _update_norm(run, "n2", llama_seed)
    assert norms["fedprox"] < 0.8 * norms["fedavg"]


def test_dp_clipping_bounds_each_node_update(tmp_path, llama_seed, shards, home):
    from transformers import AutoModelForCausalLM

    clip = 1e-3
    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=1, evaluate_every=1, dp_clip=clip, dp_noise=0.0,
                        local_steps=3, min_nodes=3)
    result = run_federation(InProcessGrid(cfg.to_flat(), nodes), cfg)
    assert _update_norm(tmp_path, "n0", llama_seed) > 10 * clip  # what the node sent was not small
    base = dict(AutoModelForCausalLM.from_pretrained(llama_seed).named_parameters())
    final = load_state(tmp_path / "work" / "checkpoints" / "round-0001.safetensors")
    moved = math.sqrt(sum(float(((v - base[k].detach()) ** 2).sum()) for k, v in final.items()))
    assert 0 < moved <= clip * 1.001
    assert read_card(result["expert"]).expert.federation["differential_privacy"]["clipping_norm"] == clip


def test_nodes_with_another_seed_are_refused_by_name(tmp_path, llama_seed, qwen2_seed, shards, home):
    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=1)
    for n in nodes:
        n["base"] = str(qwen2_seed)
    with pytest.raises(ExpertmixError, match=r"round 1: no node returned an update.*n0.*differs from the coordinator"):
        run_federation(InProcessGrid(cfg.to_flat(), nodes), cfg)


def test_a_failing_node_is_named_and_recorded_and_fewer_nodes_than_min_nodes_are_not_averaged(tmp_path, llama_seed,
                                                                                           shards, home):
    """n2's data cannot hold out validation data: every round reports it by name (its message, not Flower's
    wrapper), the card records it; with min-nodes 3 no round may average the two others, so nothing is written."""
    broken = {**shards, "n2": shards["n2"].with_name("n2-one-doc.jsonl")}
    broken["n2"].write_text(shards["n2"].read_text().splitlines()[0] + "\n")
    cfg, nodes = _setup(tmp_path, llama_seed, broken, home, rounds=2, min_nodes=2)
    result = run_federation(InProcessGrid(cfg.to_flat(), nodes), cfg)
    history = json.loads((tmp_path / "work" / "state.json").read_text())["history"]
    for h in history:
        assert sorted(r["name"] for r in h["nodes"]) == ["n0", "n1"] and h["aggregated"]
        assert h["errors"] == [f"node n2: {broken['n2']}: need at least 2 documents to hold out validation data "
                               f"(or give the node a validation file: 'valid' in its node config, or --node-valid "
                               f"NAME=FILE locally)"]
    rounds_log = read_card(result["expert"]).expert.federation["rounds_log"]
    assert [r["failed"] for r in rounds_log] == [h["errors"] for h in history]

    strict, nodes = _setup(tmp_path / "strict", llama_seed, broken, home, rounds=2, min_nodes=3)
    with pytest.raises(ExpertmixError, match=r"no round produced an aggregate \(min-nodes=3\).*node n2: .*need at "
                                             r"least 2 documents"):
        run_federation(InProcessGrid(strict.to_flat(), nodes), strict)
    assert not any(h["aggregated"] for h in json.loads((tmp_path / "strict" / "work" / "state.json").read_text())[
        "history"])
    assert not (tmp_path / "strict" / "work" / "result.json").exists()


def test_a_coordinator_that_fails_records_why_for_the_local_command_to_say_in_one_line(tmp_path, llama_seed,
                                                                                       shards, home):
    """Flower prints the ServerApp's traceback in its own log; the local coordinator shows the recorded reason."""
    from flwr.app import Context

    from expertmix.server.federation import main as server_main
    from expertmix.server.federation_state import FederationStore

    empty = {name: path.with_name(f"{name}-empty.jsonl") for name, path in shards.items()}
    for path in empty.values():
        path.write_text("")
    cfg, nodes = _setup(tmp_path, llama_seed, empty, home, rounds=1)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flat())
    with pytest.raises(ExpertmixError, match="round 1: no node returned an update"):
        server_main(InProcessGrid(cfg.to_flat(), nodes), ctx)
    failure = FederationStore(cfg.work_dir).failure()
    assert failure.startswith("round 1: no node returned an update (node ") and "no documents" in failure
    assert all(f"node {n}: " in failure for n in shards)


def test_a_federation_resumes_from_a_copied_work_folder_and_not_with_fewer_rounds_than_done(tmp_path, llama_seed,
                                                                                         shards, home):
    import shutil

    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=3)
    with pytest.raises(KeyboardInterrupt):  # stopped in round 3: two rounds done
        run_federation(InProcessGrid(cfg.to_flat(), nodes, fail_on_train_call=3), cfg)
    fewer, _ = _setup(tmp_path, llama_seed, shards, home, rounds=1)
    with pytest.raises(ExpertmixError, match="--rounds 1: the federation in .* has done 2 rounds already; give at "
                                             "least 2"):
        run_federation(InProcessGrid(fewer.to_flat(), nodes), fewer)
    shutil.copytree(tmp_path / "work", tmp_path / "restored")  # a backup restored elsewhere resumes where it is
    moved, _ = _setup(tmp_path, llama_seed, shards, home, rounds=3, work_dir=str(tmp_path / "restored"))
    grid = InProcessGrid(moved.to_flat(), nodes)
    run_federation(grid, moved)
    first = next(m for m in grid.sent if m.metadata.message_type == "train")
    assert first.content["config"]["server-round"] == 3


def test_federate_refuses_bad_node_names_an_existing_out_and_unknown_node_valid_before_starting(tmp_path,
                                                                                               llama_seed, shards,
                                                                                               home):
    from click.testing import CliRunner

    from expertmix.cli import main

    res = _federate_cli(tmp_path, llama_seed, {**shards, "../x": shards["n0"]})
    assert res.exit_code == 1 and "--node '../x': a node name uses letters" in " ".join(res.output.split())
    (tmp_path / "taken").mkdir()
    res = _federate_cli(tmp_path, llama_seed, shards, "--out", str(tmp_path / "taken"))
    assert res.exit_code == 1 and f"--out {tmp_path / 'taken'} already exists" in " ".join(res.output.split())
    assert not (tmp_path / "work").exists()  # refused before it started: the work folder it made is gone
    (tmp_path / "work").mkdir()  # ... but one that was there before stays
    res = _federate_cli(tmp_path, llama_seed, shards, "--out", str(tmp_path / "taken"))
    assert res.exit_code == 1 and (tmp_path / "work").is_dir()
    res = _federate_cli(tmp_path, llama_seed, shards, "--node-valid", f"nobody={shards['n0']}")
    assert res.exit_code == 2 and "nobody: no --node of that name" in " ".join(res.output.split())
    assert not (tmp_path / "x.toml").exists() and not (tmp_path / "work" / "logs").exists()
    res = CliRunner().invoke(main, ["federate", "--app-only", "--base", str(llama_seed), "--domain", "d",
                                    "--name", "bad name!", "--work-dir", str(tmp_path / "app-only")])
    assert res.exit_code == 1 and "invalid expert name 'bad name!'" in res.output
    res = CliRunner().invoke(main, ["federate", "--base", str(llama_seed), "--domain", "d", "--work-dir",
                                    str(tmp_path / "w2"), "--dp-noise", "0.5", "--node", f"a={shards['n0']}"])
    assert res.exit_code == 1 and "key ''" not in res.output and "dp-noise needs dp-clip" in res.output


def test_run_config_errors_name_the_key(tmp_path):
    with pytest.raises(ExpertmixError, match="unknown key.*local-stepz"):
        FederationConfig.from_run_config({"base": "s", "domain": "d", "work-dir": str(tmp_path), "local-stepz": 3})
    with pytest.raises(ExpertmixError, match="key 'fraction-train'"):
        FederationConfig.from_run_config({"base": "s", "domain": "d", "work-dir": str(tmp_path), "fraction-train": 2})
    with pytest.raises(ExpertmixError, match="dp-noise needs dp-clip"):
        FederationConfig.from_run_config({"base": "s", "domain": "d", "work-dir": str(tmp_path), "dp-noise": 1.0})


def test_federate_app_only_writes_a_flower_app_that_flower_accepts(tmp_path, llama_seed):
    from click.testing import CliRunner
    from flwr.cli.config_utils import load_and_validate

    from expertmix.cli import main

    res = CliRunner().invoke(main, ["federate", "--app-only", "--base", str(llama_seed), "--domain", "de",
                                    "--work-dir", str(tmp_path / "fed"), "--rounds", "7", "--peft", "lora",
                                    "--strategy", "fedprox", "--registry", "https://registry.example.org"])
    assert res.exit_code == 0, res.output
    config, _ = load_and_validate(tmp_path / "fed" / "app" / "pyproject.toml")  # imports both components
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "expertmix.server.federation:app",
                                 "clientapp": "expertmix.client.app:app"}
    run = FederationConfig.from_run_config(app["config"])
    assert (run.rounds, run.kind, run.strategy, run.registry) == (7, "lora", "fedprox", "https://registry.example.org")
    assert run.base == str(llama_seed.resolve())


def test_node_continues_its_adam_moments_between_rounds_and_drops_them_after_the_last(tmp_path, llama_seed,
                                                                                     shards, home):
    from expertmix.client.node import Node
    from expertmix.client.settings import NodeConfig
    from expertmix.client.weights import travelling_state

    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=3, local_steps=2)
    node = Node(cfg, NodeConfig.from_node_config(nodes[0]))
    moments = node.optimizer_file("fed-1")
    state = travelling_state(node.model())
    trainable = {n for n, p in node.model().named_parameters() if p.requires_grad}

    def steps_saved() -> set[float]:
        saved = load_state(moments)
        assert {k.partition("/")[2] for k in saved if k.startswith("exp_avg_sq/")} == trainable
        return {v.item() for k, v in saved.items() if k.startswith("step/")}

    state = node.train_round(state, 1, federation_id="fed-1").state
    assert steps_saved() == {2.0}
    state = node.train_round(state, 2, federation_id="fed-1").state
    assert steps_saved() == {4.0}  # round 2 continued round 1's AdamW instead of starting afresh
    node.train_round(state, 2, federation_id="fed-2")
    assert node.optimizer_file("fed-2") != moments and load_state(node.optimizer_file("fed-2"))
    node.train_round(state, 3, federation_id="fed-1")
    assert not moments.exists()  # the last round: nothing continues from them

    fresh = Node(cfg.model_copy(update={"keep_optimizer": False}), NodeConfig.from_node_config(nodes[0]))
    fresh.train_round(state, 1, federation_id="fed-3")
    assert not fresh.optimizer_file("fed-3").exists()


def test_node_local_steps_take_the_rates_of_the_central_schedule(tmp_path, llama_seed, shards):
    from transformers import TrainerCallback, get_cosine_schedule_with_warmup

    from expertmix.client.local_optimizer import LocalOptimizerState
    from expertmix.experts.data import pack, read_documents, tokenize_documents
    from expertmix.experts.training import TrainSettings, fit

    cfg = FederationConfig.from_run_config(dict(base=str(llama_seed), domain="d", work_dir=str(tmp_path / "w"),
                                                rounds=3, local_steps=4, lr=1e-3, warmup=0.2))
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1e-3), 3, 12)
    central = []
    for _ in range(12):
        central.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [cfg.step_lr(s) for s in range(12)] == pytest.approx(central)

    class Seen(TrainerCallback):
        rates: list[float] = []
        logged: list[float] = []

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.rates.append(optimizer.param_groups[0]["lr"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "learning_rate" in logs:
                self.logged.append(logs["learning_rate"])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_seed)
    blocks = pack(tokenize_documents(read_documents(shards["n1"]), AutoTokenizer.from_pretrained(llama_seed)), 32)
    settings = TrainSettings(max_steps=4, batch_size=2, learning_rate=5.0, warmup_ratio=0.0, lr_scheduler="constant",
                             save_steps=0, logging_steps=1, progress=False)
    fit(model, blocks, None, settings, tmp_path / "fit",
        callbacks=[LocalOptimizerState(model, lambda i: cfg.local_lr(2, i)), Seen()])
    assert Seen.rates == pytest.approx(central[4:8])  # round 2's slice of the federation's schedule
    assert Seen.logged == pytest.approx(central[4:8])  # and the node's log says so (not the Trainer's constant 5.0)


def _federate_cli(tmp_path, seed, shards, *extra: str):
    from click.testing import CliRunner

    from expertmix.cli import main

    args = ["federate", "--base", str(seed), "--domain", "prose", "--work-dir", str(tmp_path / "work"),
            *[a for n, p in shards.items() for a in ("--node", f"{n}={p}")], "--rounds", "2", "--local-steps", "2",
            "--batch-size", "4", "--seq-len", "32", "--registry", str(tmp_path / "store"), *extra]
    return CliRunner().invoke(main, args)


def test_a_federation_rerun_with_other_settings_is_refused_by_name_before_anything_starts(tmp_path, llama_seed,
                                                                                           shards, home):
    """It used to start a SuperLink and nodes, rewrite the app's config, then fail ~20 s later inside a traceback."""
    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=2)
    with pytest.raises(KeyboardInterrupt):
        run_federation(InProcessGrid(cfg.to_flat(), nodes, fail_on_train_call=2), cfg)
    res = _federate_cli(tmp_path, llama_seed, shards, "--lr", "1e-2")
    message = " ".join(res.output.split())
    assert res.exit_code == 1 and "started with other settings (differs in:" in message, res.output
    assert " lr" in message.split("differs in:")[1] and "Traceback" not in res.output
    assert not (tmp_path / "work" / "app").exists() and not (tmp_path / "work" / "logs").exists()


def test_a_second_coordinator_for_the_same_work_dir_is_refused_with_the_first_ones_pid(tmp_path, llama_seed,
                                                                                        shards, home):
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from expertmix.fsutil import lock_folder; lock_folder(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(120)", str(work)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = _federate_cli(tmp_path, llama_seed, shards)
        assert res.exit_code == 1 and f"in use by another expertmix process (pid {holder.pid})" in res.output
        assert not (work / "flower").exists()
    finally:
        holder.kill()
        holder.wait()


def test_flower_processes_outlive_neither_a_killed_coordinator_nor_its_rerun(tmp_path):
    """A coordinator killed with SIGKILL skips its cleanup: its processes get SIGTERM from the kernel, and any that
    remain (carrying its FLWR_HOME) are stopped by the next run in that work folder."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    from expertmix.server.local_federation import stop_stale_processes

    script = ("import sys, time; from pathlib import Path; from expertmix.server.local_federation import Processes; "
              "p = Processes(Path(sys.argv[1]), {}).start('child', ['sleep', '300']); print(p.pid, flush=True); "
              "time.sleep(300)")
    coordinator = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "logs")], stdout=subprocess.PIPE,
                                   text=True)
    child = psutil.Process(int(coordinator.stdout.readline()))
    coordinator.kill()
    coordinator.wait()
    psutil.wait_procs([child], timeout=10)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE

    home, other = tmp_path / "flower", tmp_path / "other-flower"
    stale = subprocess.Popen(["sleep", "300"], env={**os.environ, "FLWR_HOME": str(home)})
    unrelated = subprocess.Popen(["sleep", "300"], env={**os.environ, "FLWR_HOME": str(other)})
    try:
        time.sleep(0.2)
        assert stop_stale_processes(home, log=lambda _: None) == [stale.pid]
        assert stale.wait(timeout=10) is not None and unrelated.poll() is None
    finally:
        for p in (stale, unrelated):
            p.kill()
            p.wait()


def test_a_finished_federation_finds_its_expert_in_a_moved_work_folder(tmp_path, llama_seed, shards, home):
    """result.json recorded the expert's absolute path: a work folder moved after the federation pointed at the
    old place. Inside the work folder it is recorded relative to it."""
    from expertmix.server.federation_state import FederationStore

    cfg, nodes = _setup(tmp_path, llama_seed, shards, home, rounds=1, evaluate_every=1, publish=False,
                        work_dir=str(tmp_path / "first"))
    result = run_federation(InProcessGrid(cfg.to_flat(), nodes), cfg)
    assert result["expert"] == str(tmp_path / "first" / "expert")
    (tmp_path / "first").rename(tmp_path / "work")
    moved = tmp_path / "work"
    assert json.loads((moved / "result.json").read_text())["expert"] == "expert"
    assert json.loads((moved / "state.json").read_text())["expert"] == "expert"
    found = FederationStore(moved).result()["expert"]
    assert found == str(moved / "expert") and read_card(found).expert.federation["rounds"] == 1
    res = _federate_cli(tmp_path, llama_seed, shards, "--rounds", "1", "--no-publish")
    message = " ".join(res.output.split())
    assert res.exit_code == 1 and f"has already finished (expert at {moved / 'expert'})" in message, res.output
    assert moved.is_dir() and not (moved / "logs").exists()
