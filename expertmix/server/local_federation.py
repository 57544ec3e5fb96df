"""A whole federation on one machine, for trying it out: a ``flower-superlink``, one ``flower-supernode`` per
node (each with its own data through its node config) and ``flwr run``, on loopback ports picked here.

Real processes rather than Flower's simulation: the simulation needs Ray, while SuperLink and SuperNodes run
exactly the code a deployment runs (the ClientApp process per message, heartbeats, a node that dies), so what
works here works across machines. Flower's state for the run (its config.toml, installed app bundles) lives in
``WORK/flower`` (``FLWR_HOME``), never in the user's ``~/.flwr``; each process logs to ``WORK/logs``.
Every process started here, and whatever it started, is stopped on exit, on errors and on Ctrl-C.

The Flower app (``WORK/app/pyproject.toml``) is generated from the run config: its components point at the
installed ``expertmix`` (``expertmix.server.federation:app``, ``expertmix.client.app:app``), so the bundle
holds no code and every machine runs its own installed expertmix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w

from ..checkpoints import require_context, require_float_weights
from ..client.local_optimizer import moments_file
from ..client.settings import FederationConfig, NodeConfig
from ..errors import ExpertmixError
from ..fsutil import lock_folder, release_folder, remove_tree, write_json_atomic, write_text_atomic
from ..hub.repo import validate_name
from .federation_state import FederationStore

SUPERLINK_NAME = "expertmix-local"
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SERVERAPP, CLIENTAPP = "expertmix.server.federation:app", "expertmix.client.app:app"


@dataclass
class LocalNode:
    """One node of a local federation: a name and its private data."""

    name: str
    data: Path
    valid: Path | None = None


@dataclass
class LocalFederation:
    """A federation run on this machine: the run config and the nodes."""

    config: FederationConfig
    nodes: list[LocalNode]
    threads_per_node: int = 1
    debug_dir: Path | None = None
    cache_dir: Path | None = None
    startup_timeout: float = 120.0
    env: dict[str, str] = field(default_factory=dict)


def write_app(folder: str | Path, cfg: FederationConfig) -> Path:
    """Write the Flower app folder (a pyproject.toml naming expertmix's apps, with ``cfg`` as run config)."""
    from importlib.metadata import version

    folder = Path(folder)
    project = {
        "project": {"name": "expertmix-federation", "version": version("expertmix"),
                    "description": "Federated expert training with expertmix", "license": "Apache-2.0",
                    "dependencies": [f"flwr>={version('flwr')}", f"expertmix>={version('expertmix')}"]},
        "tool": {"flwr": {"app": {"publisher": "expertmix",
                                  "components": {"serverapp": SERVERAPP, "clientapp": CLIENTAPP},
                                  "config": cfg.to_flat()}}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "pyproject.toml", tomli_w.dumps(project))
    return folder


def write_node_config(path: str | Path, node: NodeConfig) -> Path:
    """A node config as TOML (``flower-supernode --node-config node.toml``): paths survive any characters."""
    write_text_atomic(Path(path), tomli_w.dumps({k: v for k, v in node.to_flat().items() if v not in ("", 0)}))
    return Path(path)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    """A Flower executable: beside this Python first (the same environment), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise ExpertmixError(f"'{name}' not found beside {sys.executable} nor on PATH; is flwr installed?")
    return found


def _load_prctl():
    """libc's ``prctl`` on Linux (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a started process: get SIGTERM when the coordinator dies, even by SIGKILL (which skips its cleanup), so no
    SuperLink or SuperNode goes on alone. Processes are started from the coordinator's main thread, whose end is
    the process's."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class Processes:
    """Processes started for a federation, their logs, and a cleanup that also reaches their descendants."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.env = log_dir, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, float] = {}  # pid -> create time of every descendant seen (orphans included)
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` in its own session, logging to ``LOG_DIR/NAME.log``; a restart gets ``NAME-2``, ..."""
        base, n = name, 1
        while name in self.procs:
            n += 1
            name = f"{base}-{n}"
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.env, **(env or {})}, start_new_session=True,
                                    preexec_fn=_die_with_parent if _PRCTL is not None else None)
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def refresh(self) -> None:
        """Remember every descendant now alive, so one orphaned later is still found at cleanup."""
        for proc in self.procs.values():
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    self.seen[child.pid] = child.create_time()
                except psutil.Error:  # already gone
                    continue

    def manifest(self) -> dict:
        return {name: {"pid": p.pid, "log": str(self.log_dir / f"{name}.log")} for name, p in self.procs.items()}

    def close(self, grace: float = 10.0) -> None:
        """Stop everything: SIGTERM, then SIGKILL whatever is left after ``grace`` seconds."""
        self.refresh()
        targets: list[psutil.Process] = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    targets.append(p)
            except psutil.Error:
                continue
        for proc in reversed(list(self.procs.values())):  # flwr run, nodes, then the SuperLink
            try:
                targets.append(psutil.Process(proc.pid))
            except psutil.NoSuchProcess:
                continue
        terminate(targets, grace)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass


def terminate(processes: list[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM each process, then SIGKILL whatever is left after ``grace`` seconds."""
    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the federation runs, so cleanup happens either way."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str, procs: Processes, name: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ExpertmixError(f"{what} exited with code {proc.returncode}:\n{procs.log_tail(name)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise ExpertmixError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s:\n{procs.log_tail(name)}")


def online_nodes(procs: Processes) -> int:
    """How many SuperNodes the SuperLink counts as online (``flwr supernode list``)."""
    out = subprocess.run([_tool("flwr"), "supernode", "list", SUPERLINK_NAME, "--format", "json"], env=procs.env,
                         capture_output=True, text=True, timeout=60)
    try:
        nodes = json.loads(out.stdout).get("nodes", [])
    except ValueError:
        return 0
    return sum(1 for n in nodes if n.get("status") == "online")


def _wait_for_nodes(procs: Processes, expected: int, timeout: float) -> None:
    """Start the run only once every node is connected, so round 1 samples all of them."""
    deadline = time.time() + timeout
    while (n := online_nodes(procs)) < expected:
        for name, proc in procs.procs.items():
            if name.startswith("node-") and proc.poll() is not None:
                raise ExpertmixError(f"{name} exited with code {proc.returncode}:\n{procs.log_tail(name)}")
        if time.time() > deadline:
            raise ExpertmixError(f"only {n} of {expected} nodes connected within {timeout:g}s; see {procs.log_dir}")
        time.sleep(1.0)


def run_local_federation(fed: LocalFederation, log: Callable[[str], None] = print, progress: bool = True,
                         on_started: Callable[[Processes], None] | None = None) -> dict:
    """Run the federation with local Flower processes until the expert is written (and published).

    Returns the server's result (``expert`` folder, ``published`` ref). ``on_started`` is called with the
    running processes once every node is up (e.g. to watch them).
    """
    cfg = fed.config
    if len(fed.nodes) < cfg.min_nodes:
        raise ExpertmixError(f"{len(fed.nodes)} node(s) given but the run config asks for min-nodes={cfg.min_nodes}")
    names = [n.name for n in fed.nodes]
    for name in names:
        if not NODE_NAME_RE.match(name) or ".." in name:
            raise ExpertmixError(f"--node {name!r}: a node name uses letters, digits, '.', '_' and '-' (it names the "
                                 f"node's log and config files)")
    if len(set(names)) != len(names):
        raise ExpertmixError(f"node names must be unique, got {names}")
    validate_name(cfg.expert_name)
    require_float_weights(cfg.base, "federated training")
    require_context(cfg.base, cfg.seq_len)
    for n in fed.nodes:
        if not Path(n.data).exists():
            raise ExpertmixError(f"node {n.name}: data {n.data} does not exist")
        if n.valid is not None and not Path(n.valid).exists():
            raise ExpertmixError(f"node {n.name}: validation data {n.valid} does not exist")
    work = Path(cfg.work_dir).resolve()
    made_here = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    lock_folder(work)  # one coordinator per work folder: a second would run a second federation into it
    refused = True
    try:
        _refuse_before_start(fed, work)
        refused = False
        return _run_locked(fed, work, log, progress, on_started)
    finally:
        release_folder(work)
        if refused and made_here:  # refused before anything started: leave no folder behind (never one given)
            remove_tree(work)


def _refuse_before_start(fed: LocalFederation, work: Path) -> None:
    """The checks that need the work folder's record, made before any process starts or any file is written."""
    cfg = fed.config
    store = FederationStore(work)
    if (done := store.result()) is not None:
        raise ExpertmixError(f"the federation in {work} has already finished (expert at {done['expert']}); "
                             f"choose another --work-dir")
    store.check(cfg)  # other settings are refused here, before any process starts or any file is rewritten
    if cfg.out_dir.exists() and not (store.state() or {}).get("expert"):  # now, not after every round has trained
        raise ExpertmixError(f"--out {cfg.out_dir} already exists; choose another --out or remove it")


def _run_locked(fed: LocalFederation, work: Path, log: Callable[[str], None], progress: bool,
                on_started: Callable[[Processes], None] | None) -> dict:
    cfg = fed.config
    store = FederationStore(work)
    done = store.state() or {}
    if done.get("rounds_done"):
        log(f"resuming the federation in {work} after round {done['rounds_done']} of {cfg.rounds}")
    flwr_home, logs = work / "flower", work / "logs"
    flwr_home.mkdir(parents=True, exist_ok=True)
    stop_stale_processes(flwr_home, log)
    app_dir = write_app(work / "app", cfg)
    port = free_port()
    write_text_atomic(flwr_home / "config.toml", tomli_w.dumps(
        {"superlink": {"default": SUPERLINK_NAME, SUPERLINK_NAME: {"address": f"127.0.0.1:{port}", "insecure": True}}}))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", **fed.env}

    procs = Processes(logs, env)
    with _sigterm_as_interrupt():
        try:
            link = procs.start("superlink", [_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                             "--port", str(port), "--disable-runtime-dependency-installation"])
            _wait_for_port(port, link, fed.startup_timeout, "flower-superlink", procs, "superlink")
            log(f"SuperLink on 127.0.0.1:{port}; logs in {logs}")
            for node in fed.nodes:
                start_node(procs, node, port, work, fed)
            write_json_atomic(work / "processes.json", procs.manifest())
            _wait_for_nodes(procs, len(fed.nodes), fed.startup_timeout)
            if on_started is not None:
                on_started(procs)
            run = procs.start("flwr-run", [_tool("flwr"), "run", str(app_dir), SUPERLINK_NAME, "--stream"])
            _watch(procs, run, work, cfg, progress, log)
            result = store.result()
            if result is None:
                if (failure := store.failure()) is not None:  # the ServerApp's own reason, as one line
                    raise ExpertmixError(f"{failure} (Flower's log: {logs / 'flwr-run.log'})")
                raise ExpertmixError(f"the federation ended without an expert (flwr run exited with code "
                                     f"{run.returncode}); last lines of {logs / 'flwr-run.log'}:\n"
                                     f"{procs.log_tail('flwr-run', 40)}")
            drop_moments(fed, work, store)
            return result
        finally:
            procs.close()


def round_line(entry: dict, rounds: int) -> str:
    """One round of the federation's record as a console line."""
    parts = [f"round {entry['round']}/{rounds} done: {len(entry.get('nodes', []))} node(s)"
             + ("" if entry.get("aggregated", True) else ", not aggregated")]
    if (loss := entry.get("train", {}).get("train-loss")) is not None:
        parts.append(f"train loss {float(loss):.4f}")
    if entry.get("valid_loss_before") is not None:
        parts.append(f"validation loss of the state sent {entry['valid_loss_before']:.4f}")
    if (after := (entry.get("evaluate") or {}).get("valid_loss")) is not None:
        parts.append(f"validation loss after {after:.4f}")
    return ", ".join(parts)


def drop_moments(fed: LocalFederation, work: Path, store: FederationStore) -> None:
    """Remove the nodes' optimizer moments once the federation is over: a node that missed the last round (it
    failed, or was not sampled) never removed its own, and they weigh twice the trainable weights."""
    federation_id = (store.state() or {}).get("federation_id")
    if federation_id is None:
        return
    cache = Path(fed.cache_dir or work / "cache")
    for node in fed.nodes:
        moments_file(cache, federation_id, node.name).unlink(missing_ok=True)


def stop_stale_processes(flwr_home: Path, log: Callable[[str], None] = print) -> list[int]:
    """Stop Flower processes left by an earlier coordinator of this work folder that was killed (SIGKILL skips its
    cleanup): they carry its ``FLWR_HOME`` and would go on running the old federation into the same folder.
    Called with the folder locked, so no live coordinator owns them."""
    stale = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("FLWR_HOME") == str(flwr_home):
                stale.append(p)
        except psutil.Error:  # gone, or another user's
            continue
    if stale:
        log(f"stopping {len(stale)} Flower process(es) left running by an earlier, killed run of this federation "
            f"(pids {', '.join(str(p.pid) for p in stale)})")
        terminate(stale)
    return [p.pid for p in stale]


def start_node(procs: Processes, node: LocalNode, port: int, work: Path, fed: LocalFederation) -> subprocess.Popen:
    """Start (or restart) one SuperNode with its node config; its own loopback port for the ClientApp runtime."""
    node_cfg = NodeConfig(data=str(Path(node.data).resolve()),
                          valid=str(Path(node.valid).resolve()) if node.valid else "", name=node.name,
                          cache_dir=str(fed.cache_dir or work / "cache"),
                          debug_dir=str(fed.debug_dir) if fed.debug_dir else "", threads=fed.threads_per_node)
    toml = write_node_config(work / "nodes" / f"{node.name}.toml", node_cfg)
    threads = str(max(1, fed.threads_per_node))
    argv = [_tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
            "--node-config", str(toml)]
    return procs.start(f"node-{node.name}", argv, env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})


def _watch(procs: Processes, run: subprocess.Popen, work: Path, cfg: FederationConfig, progress: bool,
           log: Callable[[str], None] = print) -> None:
    """Wait for ``flwr run`` to end, showing the rounds done and the nodes that failed in each; fail early if the
    SuperLink dies."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    store = FederationStore(work)
    with Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("rounds", total=cfg.rounds)
        shown = len((store.state() or {}).get("history", []))  # rounds a resumed run had done before

        def report() -> None:
            nonlocal shown
            if (record := store.state()) is None:
                return
            bar.update(task, completed=record.get("rounds_done", 0))
            history = record.get("history", [])
            for entry in history[shown:]:
                for error in entry.get("errors", []):
                    log(f"round {entry['round']}: {error}; continuing with the other nodes (logs: {work / 'logs'})")
                log(round_line(entry, cfg.rounds))  # also where no progress bar shows (output to a file)
            shown = max(shown, len(history))

        while run.poll() is None:
            procs.refresh()
            if procs.procs["superlink"].poll() is not None:
                raise ExpertmixError(f"flower-superlink exited during the run:\n{procs.log_tail('superlink')}")
            report()
            time.sleep(1.0)
        report()
        bar.update(task, completed=cfg.rounds if store.result() else bar.tasks[0].completed)
