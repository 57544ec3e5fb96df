"""The expert registry under load: download throughput against a plain disk copy, and many clients at once.

Side by side in one run, against a real ``expertmix serve`` process on loopback (SQLite + blob folder):

1. a ~500 MB dense expert (the shared seed-s tokenizer, a wider Llama in bf16, a domain embedding made
   with seed-s on the shared corpus) is published, then downloaded three ways, each ``--repeats`` times:
   copying its weights blob on disk (``shutil.copyfile``, the baseline), the stock
   ``huggingface_hub.hf_hub_download`` of the weights file into a fresh cache, and ``expertmix pull``
   of the whole expert (all files, then every file's hash checked). Throughput is MB/s of the weights
   file (the pull: of all files) and the ratio to the disk copy (target: at least 0.5x).
2. ``--clients`` concurrent clients (threads, one keep-alive HTTP connection each) pull the seed-s
   expert over and over for ``--seconds`` seconds, each pull the requests ``snapshot_download`` makes
   (revision info, tree, then every file), each response checked for status and size: requests served,
   errors (target: 0), p50 / p99 request latency, pulls and bytes per second.

Both the server and the clients run on this machine, so the clients take CPU from the server.

    python benchmarks/registry.py --shared ../shared
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from huggingface_hub import hf_hub_download  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from expertmix.experts.data import read_documents  # noqa: E402
from expertmix.experts.embedding import SeedEmbedder, domain_embedding  # noqa: E402
from expertmix.fsutil import sha256_file  # noqa: E402
from expertmix.hub.card import DataInfo, EmbeddingInfo, ExpertCard, ExpertInfo  # noqa: E402
from expertmix.hub.fingerprint import architecture_of, fingerprint_tokenizer, fingerprint_weights  # noqa: E402
from expertmix.hub.remote import RemoteRegistry  # noqa: E402
from expertmix.hub.repo import save_domain_embedding  # noqa: E402
from expertmix.server.registry import create_token  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_card(folder: Path, name: str, seed: Path, embedding: torch.Tensor, docs: int) -> None:
    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    info = ExpertInfo(name=name, domain="en", languages=["en"], kind="dense", base_model=str(seed),
                      base_fingerprint=fingerprint_weights(folder), architecture=architecture_of(config),
                      tokenizer_fingerprint=fingerprint_tokenizer(tok),
                      embedding=EmbeddingInfo(model="seed", dim=int(embedding.numel()), documents=docs),
                      data=DataInfo(documents=docs, tokens=0, sources=["corpus/en.valid.jsonl"]))
    ExpertCard(expert=info).save(folder)
    save_domain_embedding(folder, embedding, "seed", docs)


def build_experts(shared: Path, work: Path, size_mb: int) -> tuple[Path, Path]:
    """The seed-s expert (small) and a wider bf16 Llama of about ``size_mb`` MB with seed-s's tokenizer."""
    seed = shared / "seeds" / "seed-s"
    docs = read_documents(shared / "corpus" / "en.valid.jsonl")
    embedding, n = domain_embedding(docs, SeedEmbedder(seed, device="cpu"), sample=16)
    small = work / "small"
    shutil.copytree(seed, small, ignore=shutil.ignore_patterns("train_info.json"))
    write_card(small, "bench/small", seed, embedding, n)

    big = work / "big"
    config = AutoConfig.from_pretrained(seed)
    hidden, inter = 1024, 2816
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((size_mb * MB / 2 - config.vocab_size * hidden) / per_layer))
    config.update({"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                   "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 64})
    log(f"building a {layers}-layer, hidden-{hidden} bf16 Llama (~{size_mb} MB)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(big)
    del model
    AutoTokenizer.from_pretrained(seed).save_pretrained(big)
    write_card(big, "bench/big", seed, embedding, n)
    return small, big


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, port: int) -> tuple:
    db = f"sqlite:///{work / 'registry.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "expertmix", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--database", db, "--blobs", str(work / "blobs")],
                            stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "wb"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, create_token(db, "bench")
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the registry did not start: {(work / 'server.log').read_text()[-2000:]}")


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def throughput(url: str, token: str, big: Path, work: Path, repeats: int) -> dict:
    remote = RemoteRegistry(url, token=token, cache_dir=work / "unused")
    t_pub = timed(remote.publish, big, name="bench/big")
    weights = big / "model.safetensors"
    size = weights.stat().st_size
    total = sum(p.stat().st_size for p in big.iterdir() if p.is_file())
    sha = sha256_file(weights)
    blob = work / "blobs" / "sha256" / sha[:2] / sha
    curl = shutil.which("curl")
    rows: dict[str, list[float]] = {"disk copy (shutil.copyfile)": [], "hf_hub_download (weights file)": [],
                                    "expertmix pull (whole expert, verified)": []}
    if curl:
        rows["curl (weights file, for reference)"] = []
    for i in range(repeats):
        dest = work / f"copy-{i}"
        rows["disk copy (shutil.copyfile)"].append(size / timed(shutil.copyfile, blob, dest) / MB)
        dest.unlink()
        cache = work / f"hf-{i}"
        secs = timed(hf_hub_download, "bench/big", "model.safetensors", endpoint=url, cache_dir=cache, token=False)
        rows["hf_hub_download (weights file)"].append(size / secs / MB)
        shutil.rmtree(cache)
        cache = work / f"pull-{i}"
        reader = RemoteRegistry(url, cache_dir=cache)
        rows["expertmix pull (whole expert, verified)"].append(total / timed(reader.pull, "bench/big") / MB)
        shutil.rmtree(cache)
        if curl:
            dest = work / f"curl-{i}"
            weights_url = f"{url}/bench/big/resolve/main/model.safetensors"
            secs = timed(subprocess.run, [curl, "-sf", "-o", str(dest), weights_url], check=True)
            rows["curl (weights file, for reference)"].append(size / secs / MB)
            dest.unlink()
    base = statistics.median(rows["disk copy (shutil.copyfile)"])
    return {"weights_mb": size / MB, "expert_mb": total / MB, "publish_s": t_pub,
            "rows": {k: {"mb_per_s": statistics.median(v), "runs": v, "ratio": statistics.median(v) / base}
                     for k, v in rows.items()}}


def load(url: str, token: str, small: Path, clients: int, seconds: float) -> dict:
    RemoteRegistry(url, token=token).publish(small, name="bench/small")
    latencies: list[float] = []
    errors: list[str] = []
    pulls = [0]
    nbytes = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    host, port = urlsplit(url).hostname, urlsplit(url).port

    def get(conn: http.client.HTTPConnection, path: str) -> bytes:
        t = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
        with lock:
            latencies.append(time.perf_counter() - t)
        return body

    def client() -> None:
        # One keep-alive connection per client, the standard library's HTTP client: the load generator
        # shares the machine's cores with the server, so it should spend as little of them as it can.
        conn = http.client.HTTPConnection(host, port, timeout=120)
        while time.perf_counter() < stop:
            try:
                sha = json.loads(get(conn, "/api/models/bench/small/revision/main"))["sha"]
                tree = json.loads(get(conn, f"/api/models/bench/small/tree/{sha}?recursive=true"))
                for entry in tree:
                    body = get(conn, f"/bench/small/resolve/{sha}/{entry['path']}")
                    if len(body) != entry["size"]:
                        raise ValueError(f"{entry['path']}: {len(body)} bytes, expected {entry['size']}")
                    with lock:
                        nbytes[0] += len(body)
                with lock:
                    pulls[0] += 1
            except Exception as exc:  # counted and reported: the target is zero
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "seconds": wall, "requests": len(lat), "errors": len(errors),
            "error_examples": errors[:3], "pulls": pulls[0], "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], "requests_per_s": len(lat) / wall,
            "mb_per_s": nbytes[0] / wall / MB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="expertmix-registry-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    small, big = build_experts(args.shared, work / "experts", args.size_mb)
    load_before = os.getloadavg()
    proc, url, token = start_server(work, args.port or free_port())
    try:
        log("throughput ...")
        tp = throughput(url, token, big, work, args.repeats)
        log(f"{args.clients} clients for {args.seconds:.0f} s ...")
        ld = load(url, token, small, args.clients, args.seconds)
    finally:
        proc.terminate()
        proc.wait()
    print(f"\nload average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"\nDownload of a {tp['expert_mb']:.0f} MB expert ({tp['weights_mb']:.0f} MB weights file), "
          f"median of {args.repeats}; publish took {tp['publish_s']:.1f} s")
    print("| path | MB/s, median (each run) | vs disk copy |\n|---|---|---|")
    for name, row in tp["rows"].items():
        runs = ", ".join(f"{x:.0f}" for x in row["runs"])
        print(f"| {name} | {row['mb_per_s']:.0f} ({runs}) | {row['ratio']:.2f}x |")
    print(f"\n{ld['clients']} concurrent clients pulling the {small.name} expert "
          f"({sum(p.stat().st_size for p in small.iterdir()) / MB:.1f} MB) for {ld['seconds']:.1f} s")
    print("| requests | errors | p50 ms | p99 ms | requests/s | pulls | MB/s |\n|---|---|---|---|---|---|---|")
    print(f"| {ld['requests']} | {ld['errors']} | {ld['p50_ms']:.1f} | {ld['p99_ms']:.1f} | "
          f"{ld['requests_per_s']:.0f} | {ld['pulls']} | {ld['mb_per_s']:.0f} |")
    if ld["error_examples"]:
        print("errors, e.g.:", *ld["error_examples"], sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps({"throughput": tp, "load": ld}, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
