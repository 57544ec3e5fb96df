"""Helpers for the registry tests: a real ``expertmix serve`` process, databases, expert folders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from huggingface_hub import constants as hf_constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertmix.hub.card import DataInfo, EmbeddingInfo, ExpertCard, ExpertInfo
from expertmix.hub.fingerprint import architecture_of, fingerprint_tokenizer, fingerprint_weights
from expertmix.hub.repo import save_domain_embedding

POSTGRES_ENV = "EXPERTMIX_TEST_POSTGRES_URL"
DATABASES = ["sqlite", "postgres"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A fresh, empty database URL of ``kind``; PostgreSQL gets its own database, dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'registry.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set (e.g. postgresql+psycopg://USER:PW@127.0.0.1/DB); .ci/run "
                    f"sets it after starting PostgreSQL")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"expertmix_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m expertmix ARGS`` as a user would."""
    proc = subprocess.run([sys.executable, "-m", "expertmix", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"expertmix {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class Registry:
    """A running registry server and what the tests need to talk to it."""

    url: str
    database_url: str
    blobs: Path
    tokens: dict[str, str]
    proc: subprocess.Popen

    def token(self, namespace: str) -> str:
        """A write token for ``namespace``, made with ``expertmix token create`` on first use."""
        if namespace not in self.tokens:
            from click.testing import CliRunner

            from expertmix.cli import main

            res = CliRunner().invoke(main, ["token", "create", "--namespace", namespace,
                                            "--database", self.database_url])
            assert res.exit_code == 0, res.output
            self.tokens[namespace] = res.output.strip().splitlines()[-1]
        return self.tokens[namespace]


@contextmanager
def serve(tmp: Path, database_url: str, blobs: str | None = None, max_upload_bytes: int | None = None,
          env: dict | None = None) -> Iterator[Registry]:
    """Start ``python -m expertmix serve`` on a free loopback port and wait until it answers."""
    port = free_port()
    blobs = blobs or str(tmp / "blobs")
    args = [sys.executable, "-m", "expertmix", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--database", database_url, "--blobs", blobs]
    if max_upload_bytes is not None:
        args += ["--max-upload-bytes", str(max_upload_bytes)]
    log = open(tmp / f"server-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                tail = (tmp / f"server-{port}.log").read_text()[-3000:]
                raise AssertionError(f"registry server exited: {tail}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError("registry server did not start within 60 s")
            time.sleep(0.1)
        yield Registry(url=url, database_url=database_url, blobs=Path(blobs), tokens={}, proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def auth(token: str | None) -> dict:
    """The Authorization header a stock Hub client sends with ``token`` (none without one)."""
    return {"authorization": f"Bearer {token}"} if token else {}


def plain_http_uploads(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """What every process that uploads to the registry with huggingface_hub must do (it has no Xet);
    also a private HF_HOME and no Hugging Face token, so nothing of the user's leaks into a test."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_TOKEN", raising=False)


def make_expert(out: Path, seed_dir: Path, name: str, domain: str, embedding: torch.Tensor,
                languages: tuple[str, ...] = ("en",), noise_seed: int = 0) -> Path:
    """A complete dense expert folder without training: the seed's weights nudged, a card, an embedding."""
    torch.manual_seed(noise_seed)
    model = AutoModelForCausalLM.from_pretrained(seed_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    tok = AutoTokenizer.from_pretrained(seed_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = ExpertInfo(name=name, domain=domain, languages=list(languages), kind="dense", base_model="seed",
                      base_fingerprint=fingerprint_weights(seed_dir),
                      architecture=architecture_of(model.config),
                      tokenizer_fingerprint=fingerprint_tokenizer(tok),
                      embedding=EmbeddingInfo(model="seed", dim=int(embedding.numel()), documents=8),
                      data=DataInfo(documents=8, tokens=256), metrics={"valid_perplexity_after": 12.5})
    ExpertCard(expert=info).save(out)
    save_domain_embedding(out, embedding, "seed", 8)
    return out


def blob_path(blobs: Path, sha: str) -> Path:
    return blobs / "sha256" / sha[:2] / sha
