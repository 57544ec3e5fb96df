"""The ``expertmix`` command line: parses arguments, calls the library, prints results."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .checkpoints import quantization_config
from .errors import ExpertmixError

# Piped output (logs, CI, `| tee`) is not a terminal: rich would wrap lines and cut table cells at 80 columns
# there, so such output gets room for whole lines; COLUMNS still sets a width where given.
_PIPED_WIDTH = 400


def _console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    if probe.is_terminal or "COLUMNS" in os.environ:
        return probe
    return Console(stderr=stderr, width=_PIPED_WIDTH)


console = _console(stderr=True)
stdout = _console()


def _table(*headers: str, title: str | None = None) -> Table:
    """A results table whose cells wrap rather than lose characters when the terminal is narrow."""
    table = Table(title=title)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def _log(msg: str) -> None:
    console.print(f"[dim]{msg}[/dim]", highlight=False)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _Group(click.Group):
    """Turns expertmix's own errors into one clear line and exit code 1; SIGTERM (a scheduler's stop, ``kill``)
    interrupts like Ctrl-C, so temporary folders are removed and checkpoints kept either way."""

    def invoke(self, ctx):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            return super().invoke(ctx)
        except ExpertmixError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt as exc:
            for note in getattr(exc, "__notes__", ()):  # e.g. where the checkpoints are and how to resume
                console.print(note, highlight=False)
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group)
@click.version_option(package_name="expertmix")
def main() -> None:
    """expertmix: train, publish, assemble, align, quantize and export mixtures of experts."""


def _registry_option(f):
    return click.option("--registry", envvar="EXPERTMIX_REGISTRY", default=None,
                        help="Registry URL or local store path (default: the local store in $EXPERTMIX_HOME).")(f)


def _token_option(f):
    return click.option("--token", envvar="EXPERTMIX_TOKEN", default=None,
                        help="Registry token (publishing, private experts); default: $EXPERTMIX_TOKEN.")(f)


def _split_source(value: str) -> tuple[str | None, str]:
    """``NAME=PATH`` as (NAME, PATH); a value that is itself an existing path, or whose part before '=' holds a
    '/', is a PATH (a Hive-style folder such as ``data/lang=de/part-0.jsonl``)."""
    name, sep, path = value.partition("=")
    if not sep or "/" in name or Path(value).exists():
        return None, value
    return name, path


def _parse_data(values: tuple[str, ...], domain: str, option: str = "--data"):
    from .experts.training import DataSource

    sources = []
    for v in values:
        name, path = _split_source(v)
        if name is None:
            name = domain if len(values) == 1 else Path(v).stem.split(".")[0]
        if not name or not path:
            raise click.BadParameter(f"{v!r}: use PATH or NAME=PATH", param_hint=option)
        if (same := next((s for s in sources if s.name == name), None)) is not None:
            # one name, one source: results, shares and routing are reported per name
            where = f"to both {same.path} and {path}" if str(same.path) != path else f"twice, both times to {path}"
            raise click.BadParameter(f"the name {name!r} is given {where}; give each name once (NAME=PATH)",
                                     param_hint=option)
        sources.append(DataSource(name=name, path=Path(path)))
    return sources


# -- contributor workflow ---------------------------------------------------------------------------

@main.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Seed model folder.")
@click.option("--data", "data", multiple=True, required=True,
              help="Training data: PATH or NAME=PATH (.txt, .jsonl, Aya layout, datasets folder). Repeatable.")
@click.option("--domain", required=True, help="Domain name recorded in the card.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output expert folder (must not exist).")
@click.option("--name", default=None, help="Expert name (NAME or ORG/NAME); default: the domain.")
@click.option("--base-id", default=None, help="Id of the base model written to the card (default: folder name).")
@click.option("--peft", "kind", type=click.Choice(["dense", "lora", "ia3"]), default="dense", show_default=True,
              help="Train the whole model (dense) or a PEFT adapter.")
@click.option("--valid", type=click.Path(path_type=Path), default=None,
              help="Validation data (default: hold out a fraction).")
@click.option("--valid-fraction", type=float, default=0.05, show_default=True)
@click.option("--text-field", default=None, help="JSONL field holding the text (default: text, or Aya inputs/targets).")
@click.option("--prune", default=None, help="Perplexity pruning, e.g. middle:0.5, bottom:0.3, top:0.5.")
@click.option("--prune-reference", type=click.Path(path_type=Path), default=None,
              help="Reference model for pruning (default: the base).")
@click.option("--mix", default=None, help="Token shares of the named sources, e.g. code=0.25,de=0.75.")
@click.option("--mix-tokens", type=int, default=None, help="Total tokens of the mixture (repeats sources if needed).")
@click.option("--embedder", default=None, help="'seed', 'minilm' or a sentence-transformers folder.")
@click.option("--language", "languages", multiple=True, help="Languages for the card (default: from the data).")
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Budget in optimizer steps.")
@click.option("--max-tokens", type=int, default=None, help="Budget in training tokens (wins over --max-steps).")
@click.option("--save-steps", type=int, default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--lora-r", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
def train(base, data, domain, out, name, base_id, kind, valid, valid_fraction, text_field, prune, prune_reference,
          mix, mix_tokens, embedder, languages, seq_len, batch_size, grad_accum, lr, max_steps, max_tokens,
          save_steps, lora_r, seed, resume):
    """Train a dense or PEFT expert from a seed and write an expert repo."""
    from .experts.training import ExpertTrainConfig, TrainSettings, train_expert

    cfg = ExpertTrainConfig(
        base=base, data=_parse_data(data, domain), domain=domain, out=out, name=name, base_id=base_id, kind=kind,
        valid=valid, valid_fraction=valid_fraction, seq_len=seq_len, text_field=text_field, prune=prune,
        prune_reference=prune_reference, mix=mix, mix_tokens=mix_tokens, embedder=embedder,
        languages=list(languages) or None, lora_r=lora_r, lora_alpha=2 * lora_r, resume=resume,
        settings=TrainSettings(max_steps=max_steps, max_tokens=max_tokens, batch_size=batch_size,
                               grad_accum=grad_accum, learning_rate=lr, save_steps=save_steps, seed=seed))
    path = train_expert(cfg, log=_log)
    from .hub.card import read_card

    m = read_card(path).expert.metrics
    stdout.print(f"expert written to {path}  (validation perplexity {m['valid_perplexity_before']:.2f} → "
              f"{m['valid_perplexity_after']:.2f})", highlight=False)
    if m["valid_perplexity_after"] > m["valid_perplexity_before"]:
        console.print(f"warning: validation perplexity rose: the expert fits its validation data worse than its base. "
                      f"Early steps at a high rate often do this; train longer (--max-steps/--max-tokens) or lower "
                      f"--lr (now {lr:g})", highlight=False)


@main.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Documents to score.")
@click.option("--reference", required=True, type=click.Path(path_type=Path), help="Reference model folder.")
@click.option("--keep", required=True, help="Which fraction to keep: bottom|middle|top:FRACTION, e.g. middle:0.5.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Pruned JSONL (scores go beside it).")
@click.option("--text-field", default=None)
def prune(data, reference, keep, out, text_field):
    """Perplexity-prune a dataset; writes the kept documents and every document's score."""
    from .experts.pruning import parse_prune_spec, prune_file

    summary = prune_file(data, out, reference, parse_prune_spec(keep), text_field=text_field, log=_log)
    click.echo(json.dumps(summary, indent=2, default=str))


# -- registry ---------------------------------------------------------------------------------------

@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Publish under this name (default: the card's expert name).")
@click.option("--tag", default=None, help="Also tag the new revision.")
@click.option("--private", is_flag=True, help="Registry servers: readable only with the namespace's token.")
@_registry_option
@_token_option
def publish(folder, name, tag, registry, private, token):
    """Publish an expert folder as a new immutable revision."""
    from .hub.store import LocalStore, open_registry

    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # plain HTTP uploads to expertmix registries
    reg = open_registry(registry, token=token)
    if private and isinstance(reg, LocalStore):
        raise click.UsageError("--private needs a registry server (--registry http://...)")
    entry = reg.publish(folder, name=name, tag=tag, **({"private": True} if private else {}))
    click.echo(f"published {entry.name}@{entry.revision}")


@main.command()
@click.argument("ref")
@click.option("--for-base", type=click.Path(path_type=Path), default=None,
              help="Refuse the expert unless it was trained from this seed folder (weights, architecture, tokenizer).")
@_registry_option
@_token_option
def pull(ref, for_base, registry, token):
    """Fetch NAME[@REV] and print the local folder that transformers/peft load."""
    from .errors import IncompatibleExpertError
    from .hub.card import check_compatible, read_card
    from .hub.fingerprint import model_signature
    from .hub.store import open_registry

    path = open_registry(registry, token=token).pull(ref)
    if for_base is not None:
        try:
            check_compatible(model_signature(for_base), read_card(path).expert, f"the seed {for_base}")
        except IncompatibleExpertError as exc:  # the card's own name may differ from the name pulled
            raise IncompatibleExpertError(f"{ref}: {exc}") from exc
    if (path / "adapter_config.json").is_file():
        from .experts.adapter import recorded_base

        base = recorded_base(path)
        if base and Path(base).is_absolute() and not Path(base).is_dir():
            _log(f"this PEFT expert names its seed at {base}, which is not on this machine: load it on your copy "
                 f"of the seed, PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(SEED), '{path}'), "
                 f"or `expertmix eval {path} --seed SEED`")
    click.echo(str(path))


def _registry_name(reg) -> str:
    """How a registry is named to the user: its URL, or the local store's folder."""
    return getattr(reg, "url", None) or f"the local store {getattr(reg, 'root', '')}"


@main.command(name="list")
@_registry_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(registry, token, as_json):
    """List the experts in the registry."""
    from .hub.store import open_registry

    reg = open_registry(registry, token=token)
    entries = reg.list()
    if as_json:
        click.echo(json.dumps([e.summary() for e in entries], indent=2))
        return
    if not entries:
        stdout.print(f"no experts in {_registry_name(reg)}: publish one with `expertmix publish EXPERT_FOLDER`",
                     highlight=False)
        return
    table = _table("name", "revision", "domain", "kind", "languages", "base", "valid ppl")
    for e in entries:
        x = e.card.expert
        ppl = x.metrics.get("valid_perplexity_after")
        table.add_row(e.name, e.revision[:12], x.domain, x.kind, ",".join(x.languages), x.base_model,
                      f"{ppl:.2f}" if ppl is not None else "")
    stdout.print(table)


@main.command()
@click.argument("ref")
@_registry_option
@_token_option
def show(ref, registry, token):
    """Print an expert's card fields and files as JSON (REF: NAME[@REV] in the registry, or an expert folder)."""
    from .fsutil import sha256_file
    from .hub.repo import validate_expert_folder
    from .hub.store import expert_summary, open_registry

    if Path(ref).is_dir():  # a folder not yet published: the same fields, checked as publish would check them
        folder = validate_expert_folder(ref)
        x = folder.card.expert
        click.echo(json.dumps({**expert_summary(x.name, None, x), "folder": str(folder.path.resolve()),
                               "card": x.model_dump(mode="json"),
                               "files": [{"path": f.relative_to(folder.path).as_posix(), "sha256": sha256_file(f),
                                          "size": f.stat().st_size} for f in folder.files]}, indent=2))
        return
    e = open_registry(registry, token=token).show(ref)
    click.echo(json.dumps({**e.summary(), "refs": e.refs, "card": e.card.expert.model_dump(mode="json"),
                           "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in e.files]},
                          indent=2))


# -- registry service (issue 4) ---------------------------------------------------------------------

@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--database", default=None,
              help="SQLAlchemy URL, e.g. postgresql+psycopg://USER:PW@HOST/DB (default: SQLite in "
                   "$EXPERTMIX_HOME/registry).")
@click.option("--blobs", default=None,
              help="Blob folder or fsspec URL (default: $EXPERTMIX_HOME/registry/blobs).")
@click.option("--max-upload-bytes", type=int, default=None, help="Refuse larger files (default 20 GiB).")
@click.option("--public-url", default=None, help="URL clients reach the server at, if not the one asked.")
def serve(host, port, database, blobs, max_upload_bytes, public_url):
    """Run the expert registry: a Hugging Face Hub-compatible server with expert search."""
    from .server.registry import RegistrySettings
    from .server.registry import serve as run_server

    settings = RegistrySettings.from_env(database_url=database, blobs_url=blobs,
                                         max_upload_bytes=max_upload_bytes, public_url=public_url)
    _log(f"expertmix registry: database {settings.database_url.split('@')[-1]}, blobs {settings.blobs_url}")
    run_server(settings, host=host, port=port)


@main.group()
def token() -> None:
    """Registry write tokens."""


@token.command(name="create")
@click.option("--namespace", required=True, help="The namespace (ORG) the token may write to.")
@click.option("--database", default=None, help="The registry's database URL (as given to `expertmix serve`).")
@click.option("--label", default="", help="A note stored with the token.")
@click.option("--init", is_flag=True,
              help="Create the registry's database if it has none yet (by default it must exist: `serve` makes it).")
def token_create(namespace, database, label, init):
    """Create a token for NAMESPACE; it is printed once and stored only hashed."""
    from .server.registry import RegistrySettings, create_token

    url = RegistrySettings.from_env(database_url=database).database_url
    click.echo(create_token(url, namespace, label, init=init))


@token.command(name="list")
@click.option("--namespace", default=None, help="Only this namespace's tokens.")
@click.option("--database", default=None, help="The registry's database URL (as given to `expertmix serve`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def token_list(namespace, database, as_json):
    """List the registry's tokens (id, namespace, label, created); the tokens themselves are not stored."""
    from .server.registry import RegistrySettings, list_tokens

    rows = list_tokens(RegistrySettings.from_env(database_url=database).database_url, namespace)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tokens" + (f" for namespace {namespace!r}" if namespace else ""))
        return
    table = _table("id", "namespace", "label", "created")
    for r in rows:
        table.add_row(str(r["id"]), r["namespace"], r["label"], r["created"])
    stdout.print(table)


@token.command(name="revoke")
@click.argument("token_id", type=int)
@click.option("--database", default=None, help="The registry's database URL (as given to `expertmix serve`).")
def token_revoke(token_id, database):
    """Revoke token TOKEN_ID (from `token list`): the registry refuses it from the next request on."""
    from .server.registry import RegistrySettings, revoke_token

    gone = revoke_token(RegistrySettings.from_env(database_url=database).database_url, token_id)
    click.echo(f"revoked token {gone['id']} of namespace {gone['namespace']}"
               + (f" ({gone['label']})" if gone["label"] else ""))


def _hex_prefix(value: str | None) -> str | None:
    """A fingerprint prefix as the registries store it (lowercase hex); the same refusal for every registry."""
    if value is None:
        return None
    if not value or len(value) > 64 or any(c not in "0123456789abcdef" for c in value.lower()):
        raise click.BadParameter(f"{value!r} is not a hex fingerprint (or a prefix of one; at most 64 digits)",
                                 param_hint="--base-fingerprint")
    return value.lower()


@main.command()
@click.option("--domain", default=None)
@click.option("--language", default=None)
@click.option("--kind", type=click.Choice(["dense", "lora", "ia3"]), default=None)
@click.option("--base-fingerprint", default=None, callback=lambda _c, _p, v: _hex_prefix(v),
              help="Base weights fingerprint (a prefix is enough).")
@click.option("--like", "like", type=click.Path(path_type=Path, exists=True), default=None,
              help="Rank experts by similarity to the domain embedding of this data file or folder.")
@click.option("--base", "seed_dir", type=click.Path(path_type=Path), default=None,
              help="With --like: the seed folder, to embed the data like experts embedded with 'seed'.")
@click.option("--text-field", default=None, help="With --like: the JSONL field holding the text.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_registry_option
@_token_option
def search(domain, language, kind, base_fingerprint, like, seed_dir, text_field, limit, as_json, registry,
           token):
    """Find experts by domain, language, kind and base fingerprint, or nearest to your data (--like)."""
    from .hub.similarity import search_like
    from .hub.store import open_registry

    reg = open_registry(registry, token=token)
    filters = {"domain": domain, "language": language, "kind": kind, "base_fingerprint": base_fingerprint}
    if like is not None:
        hits = search_like(reg, like, seed_dir=seed_dir, text_field=text_field, limit=limit, **filters)
    else:
        hits = reg.search(limit=limit, **filters)
    if as_json:
        click.echo(json.dumps([{**e.summary(), "score": s} for e, s in hits], indent=2))
        return
    if not hits:
        asked = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in filters.items() if v is not None)
        stdout.print(f"no experts in {_registry_name(reg)} match{f' {asked}' if asked else ''}"
                     f"{' (--like: none embedded comparably)' if like else ''}", highlight=False)
        return
    extra = ["similarity"] if like else []
    table = _table("name", "revision", "domain", "kind", "languages", "base", *extra)
    for e, s in hits:
        x = e.card.expert
        table.add_row(e.name, e.revision[:12], x.domain, x.kind, ",".join(x.languages), x.base_model,
                      *([f"{s:.4f}"] if like else []))
    stdout.print(table)


# -- alignment --------------------------------------------------------------------------------------

_REWARD_HELP = ("Reward: script, keyword, multilingual, arithmetic (built in), module:function, "
                "file.py:function, or a sequence-classification reward-model folder.")


@main.group()
def prefs() -> None:
    """Preference data for alignment."""


@prefs.command(name="generate")
@click.option("--policy", required=True, type=click.Path(path_type=Path), help="Model or mix to sample.")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help="Prompts JSONL: prompt (or Aya inputs), language, and fields the reward reads.")
@click.option("--reward", required=True, help=_REWARD_HELP)
@click.option("--k", type=click.IntRange(min=2), default=4, show_default=True,
              help="Completions sampled per prompt (a pair needs two).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Preference pairs JSONL.")
@click.option("--language", "languages", multiple=True,
              help="Only prompts in this language ('language_code' or 'language' field; repeatable).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--min-margin", type=float, default=0.0, show_default=True,
              help="Skip prompts whose best and worst scores differ by no more than this.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per generate call.")
@click.option("--seed", type=int, default=0, show_default=True)
def prefs_generate(policy, prompts, reward, k, out, languages, max_new_tokens, temperature, min_margin,
                   batch_size, seed):
    """Sample k completions per prompt, score them, write best/worst pairs (all scores kept for audit)."""
    from .alignment.preferences import generate_preference_file

    summary = generate_preference_file(policy, prompts, reward, out, k, list(languages) or None,
                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                       min_margin=min_margin, batch_size=batch_size, seed=seed, log=_log)
    table = _table("language", "prompts", "pairs", "ties", "below margin", "mean score",
                   title=f"preference pairs → {out}")
    for lang, s in summary.items():
        table.add_row(lang, str(s["prompts"]), str(s["pairs"]), str(s["ties"]), str(s["below_margin"]),
                      f"{s['mean_score']:.4f}")
    stdout.print(table)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["dpo", "rloo"]), required=True)
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="RLOO: training prompts.")
@click.option("--prefs", "prefs_file", type=click.Path(path_type=Path), default=None,
              help="DPO: preference pairs JSONL (from `expertmix prefs generate`).")
@click.option("--reward", default=None,
              help=_REWARD_HELP + " Required for RLOO; for DPO it scores monitoring samples.")
@click.option("--k", type=click.IntRange(min=2), default=4, show_default=True,
              help="RLOO: samples per prompt (the leave-one-out baseline needs two).")
@click.option("--beta", type=click.FloatRange(min=0), default=None,
              help="KL coefficient (default: 0.05 rloo, 0.1 dpo).")
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts (RLOO) or pairs (DPO) per step.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--train-router/--freeze-router", default=True, show_default=True,
              help="Whether the mix's router trains too.")
@click.option("--aux-loss", "aux_loss", type=float, default=None,
              help="MoE mixes: load-balancing loss coefficient added to the policy loss (default: the mix's "
                   "router_aux_loss_coef, 0.05 when it records none; 0 turns it off). Refused for a dense model.")
@click.option("--language", "languages", multiple=True,
              help="Train only on this language ('language_code' or 'language' field; repeatable).")
@click.option("--eval-prompts", type=click.Path(path_type=Path), default=None,
              help="Held-out prompts: reward and KL per language before and after.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-steps", type=click.IntRange(min=0), default=25, show_default=True,
              help="Checkpoint every N steps in OUT.partial (0: never).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Aligned checkpoint folder (must not exist).")
def align(model, method, prompts, prefs_file, reward, k, beta, lr, steps, batch_size, max_new_tokens,
          train_router, aux_loss, languages, eval_prompts, seed, save_steps, resume, out):
    """Align a mix or causal LM with DPO or RLOO; logs reward, KL and per-language reward every step."""
    from .alignment.align import AlignConfig
    from .alignment.align import align as run_align

    if method == "dpo":
        _refuse_unused({"prompts": "--prompts", "k": "--k"}, "--method dpo (it trains on --prefs pairs)")
    else:
        _refuse_unused({"prefs_file": "--prefs"}, "--method rloo (it samples --prompts)")
    cfg = AlignConfig(model=model, out=out, method=method, prompts=prompts, prefs=prefs_file, reward=reward,
                      k=k, beta=beta, lr=lr, steps=steps, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, train_router=train_router, aux_loss_coef=aux_loss,
                      languages=list(languages) or None, eval_prompts=eval_prompts, seed=seed,
                      save_steps=save_steps, resume=resume)
    s = run_align(cfg, log=_log)
    first, last = s["first_steps"], s["last_steps"]
    table = _table("metric", f"first {s['steps_averaged']} steps", f"last {s['steps_averaged']} steps",
                  title=f"{method} (beta {s['beta']})")
    for key in ("reward", "sample_reward", "kl", "loss"):
        if key in first:
            table.add_row(key, f"{first[key]:.4f}", f"{last[key]:.4f}")
    stdout.print(table)
    if s["eval_before"] is not None:
        ev = _table("language", "reward before", "reward after", "KL after", title="held-out prompts")
        before, after = s["eval_before"], s["eval_after"]
        for lang, row in after["per_language"].items():
            ev.add_row(lang, f"{before['per_language'][lang]['reward']:.4f}", f"{row['reward']:.4f}",
                       f"{row['kl']:.4f}")
        ev.add_row("all", f"{before['reward']:.4f}", f"{after['reward']:.4f}", f"{after['kl']:.4f}")
        stdout.print(ev)
    stdout.print(f"aligned model written to {out} (per-step log: {out / 'align_log.jsonl'})", highlight=False)


# -- assembling mixes (Nexus) -----------------------------------------------------------------------

def _refuse_unused(options: dict[str, str], mode: str) -> None:
    """Refuse options given on the command line that ``mode`` does not use (``options``: parameter -> flag), rather
    than run without them as if they had been applied."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [flag for name, flag in options.items() if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {mode}")


def _named_sources(values: tuple[str, ...], option: str = "--data"):
    """``NAME=PATH`` (or a PATH whose file name starts with the name, e.g. code.valid.jsonl); ``option`` names the
    option they came from in errors."""
    if not values:
        return []
    first = _split_source(values[0])[1]
    return _parse_data(values, Path(first).name.split(".")[0], option)


def _budget_options(f):
    for opt in reversed([
        click.option("--seq-len", type=int, default=256, show_default=True),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--lr", type=float, default=None, help="Peak learning rate (default: 3e-4, or the recipe's)."),
        click.option("--max-steps", type=int, default=None, help="Budget in optimizer steps."),
        click.option("--max-tokens", type=int, default=None, help="Budget in training tokens (wins over --max-steps)."),
        click.option("--save-steps", type=int, default=100, show_default=True, help="Checkpoint every N steps."),
        click.option("--random-seed", "run_seed", type=int, default=0, show_default=True, help="Random seed."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint."),
    ]):
        f = opt(f)
    return f


def _settings(batch_size, grad_accum, lr, max_steps, max_tokens, save_steps, run_seed, default_steps=None):
    from .experts.training import TrainSettings

    return TrainSettings(max_steps=max_steps if max_steps is not None or max_tokens else default_steps,
                         max_tokens=max_tokens, batch_size=batch_size, grad_accum=grad_accum,
                         learning_rate=3e-4 if lr is None else lr, save_steps=save_steps, seed=run_seed)


@main.command()
@click.option("--seed", "seed_dir", required=True, type=click.Path(path_type=Path), help="Seed model folder.")
@click.option("--experts", "experts", multiple=True, metavar="NAME[@REV] [NAME[@REV] ...]",
              help="Experts to mix: registry refs or expert folders (several may follow one --experts). "
                   "Required for nexus; without them --kind mov|molora trains --num-experts fresh experts.")
@click.argument("more_experts", nargs=-1, metavar="")
@click.option("--data", multiple=True, required=True,
              help="Router training data, one source per domain: NAME=PATH (repeatable; mixed by --mix).")
@click.option("--mix", default=None, help="Token shares of the sources, e.g. code=0.25,de=0.75 (default: equal).")
@click.option("--router", type=click.Choice(["nexus", "linear", "merge"]), default="nexus", show_default=True,
              help="nexus: adaptive router; linear: BTX-style gate; merge: dense weight average (it has no router: "
                   "every weight trains).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output mix folder (must not exist).")
@click.option("--train-all", is_flag=True, help="Train every weight, not only the router (a merge always does).")
@click.option("--aux-loss", type=float, default=0.05, show_default=True, help="Load-balancing loss coefficient.")
@click.option("--distill", type=click.Choice(["experts", "none"]), default="experts", show_default=True,
              help="--kind nexus. experts: each --data source named after an expert's domain learns that dense "
                   "expert's next-token distributions (the experts stay in memory beside the mix); none: labels "
                   "only.")
@click.option("--seed-id", default=None, help="Id of the seed recorded in mix.json (default: folder name).")
@click.option("--text-field", default=None)
@click.option("--kind", type=click.Choice(["nexus", "mov", "molora"]), default="nexus", show_default=True,
              help="nexus: MoE of dense experts; mov / molora: routed mixture of (IA)3 / LoRA experts "
                   "(only routers and experts train).")
@click.option("--num-experts", type=int, default=4, show_default=True,
              help="mov/molora without --experts: how many fresh experts.")
@click.option("--top-k", type=int, default=None, help="mov/molora: keep the k largest merging weights (default: all).")
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True,
              help="molora, fresh experts: LoRA rank.")
@click.option("--targets", default=None,
              help="mov/molora, fresh experts: comma list of modules to adapt (default: peft's for the model).")
@click.option("--router-init", type=click.Choice(["auto", "domain", "random"]), default="auto", show_default=True,
              help="mov/molora: domain = from the experts' domain embeddings (auto: when experts have them).")
@click.option("--shared-router", is_flag=True,
              help="mov/molora: one router per block for the adapted projections of one input width.")
@_registry_option
@_budget_options
def assemble(seed_dir, experts, more_experts, data, mix, router, out, train_all, aux_loss, distill, seed_id, text_field,
             kind, num_experts, top_k, rank, targets, router_init, shared_router,
             registry, seq_len, batch_size, grad_accum, lr, max_steps, max_tokens, save_steps, run_seed, resume):
    """Upcycle experts of one seed into a Nexus MoE (or a baseline), or mix PEFT experts (MoV, MoLoRA)."""
    from .assembler.assemble import AssembleConfig
    from .assembler.assemble import assemble as run_assemble

    if kind != "nexus":
        _refuse_unused({"router": "--router", "train_all": "--train-all", "aux_loss": "--aux-loss",
                        "distill": "--distill"}, f"--kind {kind} (they are Nexus settings)")
        if experts or more_experts:
            _refuse_unused({"num_experts": "--num-experts", "rank": "--rank", "targets": "--targets"},
                           "a mix of published experts (they shape fresh experts; published ones bring their own)")
        from .assembler.lightweight import DEFAULT_LEARNING_RATES, LightweightConfig, assemble_lightweight

        lw = LightweightConfig(
            seed=seed_dir, kind=kind, data=_named_sources(data), out=out, experts=[*experts, *more_experts],
            num_experts=num_experts, top_k=top_k, rank=rank, alpha=16,
            target_modules=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
            shared_router=shared_router, router_init=router_init, registry=registry, seed_id=seed_id, mix=mix,
            seq_len=seq_len,
            text_field=text_field, resume=resume,
            settings=_settings(batch_size, grad_accum, DEFAULT_LEARNING_RATES[kind] if lr is None else lr, max_steps,
                               max_tokens, save_steps, run_seed))
        path = assemble_lightweight(lw, log=_log)
        stdout.print(f"{kind} mix written to {path}", highlight=False)
        return
    if not experts and not more_experts:
        raise click.UsageError("--kind nexus needs --experts (registry refs or expert folders)")
    _refuse_unused({"num_experts": "--num-experts", "top_k": "--top-k", "rank": "--rank", "targets": "--targets",
                    "router_init": "--router-init", "shared_router": "--shared-router"},
                   "--kind nexus (they are MoV/MoLoRA settings)")
    cfg = AssembleConfig(seed=seed_dir, experts=[*experts, *more_experts], data=_named_sources(data), out=out,
                         router=router, registry=registry, seed_id=seed_id, train_all=train_all, mix=mix,
                         seq_len=seq_len, text_field=text_field, aux_loss_coef=aux_loss, distill=distill, resume=resume,
                         settings=_settings(batch_size, grad_accum, lr, max_steps, max_tokens, save_steps,
                                            run_seed))
    path = run_assemble(cfg, log=_log)
    stdout.print(f"mix written to {path}", highlight=False)


@main.command()
@click.argument("mix", type=click.Path(path_type=Path))
@click.option("--expert", required=True, help="The new expert: registry ref NAME[@REV] or an expert folder.")
@click.option("--data", multiple=True, required=True, help="New-domain data: NAME=PATH or PATH (repeatable).")
@click.option("--replay", multiple=True, help="Old domains' data NAME=PATH (default: the mix's own, from mix.json).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output mix folder (must not exist).")
@click.option("--recipe", default="targeted", show_default=True,
              help="targeted: measured best here; isolated: only the new expert trains; paper: Gritsch et al. "
                   "(merge 1/(n+1), finetune all but the old experts, which stay frozen); paper-keep: the paper "
                   "without the merge. NAME:key=value;... changes fields of a recipe.")
@click.option("--merge", type=click.Choice(["all", "none", "token-rows"]), default=None,
              help="Override the recipe: which non-FFN weights take in the new expert's.")
@click.option("--merge-lambda", type=float, default=None, help="Override lambda (default 1/(n+1)).")
@click.option("--train", "train_groups", default=None,
              help="Override what finetunes: comma list of router,experts,shared,dense (experts = the new one).")
@click.option("--placement", type=click.Choice(["project", "fit", "fit-layers", "reinit"]), default=None,
              help="Override where the new expert enters the router.")
@click.option("--new-share", type=float, default=None, help="Share of new-domain tokens (default 0.5).")
@click.option("--passes", type=click.IntRange(min=1), default=None,
              help="Override the recipe's finetuning passes: --max-steps/--max-tokens bound the data read, "
                   "and training runs PASSES times as many steps over it.")
@click.option("--text-field", default=None)
@_registry_option
@_budget_options
def extend(mix, expert, data, replay, out, recipe, merge, merge_lambda, train_groups, placement, new_share,
           passes, text_field, registry, seq_len, batch_size, grad_accum, lr, max_steps, max_tokens, save_steps,
           run_seed, resume):
    """Add a new expert to a mix and finetune briefly on new plus replayed old data."""
    from dataclasses import replace

    from .assembler.extension import ExtendConfig, parse_recipe
    from .assembler.extension import extend as run_extend

    overrides = {k: v for k, v in dict(merge=merge, merge_lambda=merge_lambda, placement=placement,
                                       new_share=new_share, learning_rate=lr, passes=passes).items() if v is not None}
    if train_groups:
        overrides["train"] = tuple(g.strip() for g in train_groups.split(",") if g.strip())
    chosen = replace(parse_recipe(recipe), **overrides)
    cfg = ExtendConfig(mix=mix, expert=expert, data=_named_sources(data), out=out,
                       replay=_named_sources(replay, "--replay") or None, recipe=chosen,
                       recipe_name=recipe + (" (modified)" if overrides else ""), registry=registry,
                       seq_len=seq_len, text_field=text_field, resume=resume,
                       settings=_settings(batch_size, grad_accum, lr, max_steps, max_tokens, save_steps, run_seed,
                                          default_steps=15))
    path = run_extend(cfg, log=_log)
    stdout.print(f"extended mix written to {path}", highlight=False)


@main.command()
@click.argument("mix", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["qwen2-moe", "onnx"]), default="qwen2-moe", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--no-check", is_flag=True, help="Skip comparing the export's logits with the mix's.")
@click.option("--routing", type=click.Choice(["sparse", "dense"]), default="sparse", show_default=True,
              help="onnx: static loop over experts on their routed tokens (sparse) or all experts masked (dense).")
@click.option("--onnx-quantize", "onnx_quantize", multiple=True, type=click.Choice(["int8", "int4"]),
              help="onnx: also write onnxruntime-quantized graphs (int8: quantize_dynamic; int4: MatMulNBits).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="128", show_default=True,
              help="onnx int4: MatMulNBits block size (the sizes onnxruntime supports).")
def export(mix, fmt, out, no_check, routing, onnx_quantize, block_size):
    """Export a mix to a format that standard tooling loads (qwen2-moe: stock transformers; onnx: onnxruntime)."""
    from .assembler.export import export as run_export
    from .assembler.export import read_export_check

    if fmt != "onnx":
        _refuse_unused({"routing": "--routing", "onnx_quantize": "--onnx-quantize", "block_size": "--block-size"},
                       f"--format {fmt} (they are ONNX settings)")
    if fmt == "onnx":
        from .assembler.onnx_export import OnnxExportSettings, export_onnx, export_summary

        path = export_onnx(mix, out, OnnxExportSettings(routing=routing, quantize=tuple(onnx_quantize),
                                                        block_size=int(block_size)), log=_log, check=not no_check)
        summary = export_summary(path)
        stdout.print(f"exported to {path} ({summary['routing']} routing): " + ", ".join(
            f"{v} {summary['files'][v]} ({summary['bytes'][v] / 1e6:.1f} MB)" for v in summary["files"]),
            highlight=False)
    else:
        path = run_export(mix, out, fmt, log=_log, check=not no_check)
        stdout.print(f"exported to {path}", highlight=False)
    check = read_export_check(path)
    if check and check["checked"]:
        stdout.print(f"max |logit difference| against the mix ({check['runtime']}): "
                     f"{check['max_logit_difference']:.2e}", highlight=False)
    else:
        stdout.print("not checked against the mix (--no-check); export_check.json says so", highlight=False)


def _eval_quality(mix, data, reference, langs, variant, reference_variant, max_bytes, seq_len, batch_size,
                  text_field, report_json, chart, as_json):
    """``eval``'s bits-per-byte mode: run the library's evaluation and print its table."""
    from .assembler.evaluation import evaluate_quality

    report = evaluate_quality(mix, _named_sources(data), reference=reference, variant=variant,
                              reference_variant=reference_variant,
                              langs=[x for x in (langs or "").split(",") if x.strip()] or None,
                              max_bytes=max_bytes or None, window=seq_len, batch_tokens=batch_size * seq_len,
                              text_field=text_field)
    if report_json is not None:
        report.save_json(report_json)
    if chart is not None:
        report.save_chart(chart, title=f"{Path(mix).name}: bits per byte" + (" vs reference" if reference else ""))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    header, rows = report.rows()
    table = _table(*header, title="bits per byte" + (f" against {report.reference}" if reference else ""))
    for row in rows:
        table.add_row(*row)
    stdout.print(table)
    for label, path in (("report", report_json), ("chart", chart)):
        if path is not None:
            stdout.print(f"{label}: {path}", highlight=False)


@main.command()
@click.argument("mix", type=click.Path(path_type=Path))
@click.option("--scheme", type=click.Choice(["int8", "int4"]), required=True,
              help="int8: per-row weights; int4: group-wise with a float16 scale and zero point per group.")
@click.option("--group-size", type=int, default=None,
              help="int4: weights per group (default: per layer, the largest even divisor of its input width up to "
                   "128, so no row is padded).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--keep-float", default=None,
              help="Module-name parts kept float (comma list; default: lm_head,router,gate,shared_expert_gate); "
                   "gate_up_proj / down_proj also keep those weights of the routed experts float.")
def quantize(mix, scheme, group_size, out, keep_float):
    """Weight-only int8 / int4 quantization of every linear layer and the routed experts (runs on the CPU)."""
    from .assembler.quantization import DEFAULT_SKIP, QuantSpec, quantize_mix

    if group_size is not None and scheme != "int4":
        raise click.BadParameter(f"{group_size}: groups are an int4 setting; int8 has one scale per row",
                                 param_hint="--group-size")
    skip = tuple(x.strip() for x in keep_float.split(",") if x.strip()) if keep_float is not None else DEFAULT_SKIP
    spec = QuantSpec(scheme=scheme, group_size=group_size, skip=skip)
    report = quantize_mix(mix, out, spec, log=_log, progress=True)
    what = "mix" if (Path(mix) / "mix.json").is_file() else "model"
    stdout.print(f"quantized {what} written to {report.out}: {report.tensors} weight tensors, "
                 f"{report.source_bytes / 1e6:.1f} MB -> {report.quantized_bytes / 1e6:.1f} MB "
                 f"(mean relative weight error {report.stats['mean_relative_error']:.2e})", highlight=False)


@main.command(name="eval")
@click.argument("mix", type=click.Path(path_type=Path))
@click.option("--data", multiple=True, required=True, help="Evaluation data per domain: NAME=PATH (repeatable).")
@click.option("--seq-len", type=int, default=None,
              help="Tokens per block (window in bits per byte); at most the model's context (default: 256, or the "
                   "context when shorter).")
@click.option("--max-blocks", type=int, default=32, show_default=True,
              help="Blocks per domain, spread evenly over each file (0: all).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--heatmap", type=click.Path(path_type=Path), default=None, help="Save the routing matrix as PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--text-field", default=None)
@click.option("--seed", "seed_dir", type=click.Path(path_type=Path), default=None,
              help="mov/molora mixes and PEFT experts: the seed folder (default: the one they record).")
@click.option("--bpb", is_flag=True, help="Bits per byte per language, domain and script instead of perplexity.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Compare with this model (e.g. the float mix): bits-per-byte change, KL per token, top-1 flips.")
@click.option("--langs", default=None,
              help="Only these languages (comma list; matches a document's 'language_code' or 'language' field).")
@click.option("--variant", default=None, help="ONNX export of MIX: which graph (fp32, int8, int4).")
@click.option("--reference-variant", default=None, help="ONNX export as --reference: which graph.")
@click.option("--max-bytes", type=int, default=0, show_default=True, help="Bytes of text per language (0: all).")
@click.option("--report-json", type=click.Path(path_type=Path), default=None, help="bpb mode: write the report here.")
@click.option("--chart", type=click.Path(path_type=Path), default=None, help="bpb mode: PNG bar chart per language.")
def eval_(mix, data, seq_len, max_blocks, batch_size, heatmap, as_json, text_field, seed_dir, bpb, reference, langs,
          variant, reference_variant, max_bytes, report_json, chart):
    """Per-domain perplexity of a mix and its routing matrix (share of each domain's tokens per expert).

    With --bpb, --reference, --langs or --variant (and for quantized mixes and ONNX exports): bits per byte per
    language, domain and script group, compared with the reference when one is given.
    """
    from .assembler.onnx_export import is_onnx_export
    from .checkpoints import fit_seq_len

    quantized = quantization_config(mix) is not None
    if bpb or reference or langs or variant or is_onnx_export(mix) or quantized:
        if heatmap is not None:
            raise ExpertmixError(f"--heatmap draws the routing of the perplexity mode; {mix} is evaluated in bits per "
                                 f"byte here (--bpb, --reference, --langs, --variant, a quantized mix or an ONNX "
                                 f"export): use --chart and --report-json")
        _refuse_unused({"max_blocks": "--max-blocks", "seed_dir": "--seed"},
                       "the bits-per-byte mode (it reads --max-bytes per language; a lightweight mix runs on the "
                       "seed its mix.json records)")
        seq_len = fit_seq_len([mix, *([reference] if reference else [])], seq_len)
        _eval_quality(mix, data, reference, langs, variant, reference_variant, max_bytes, seq_len, batch_size,
                      text_field, report_json, chart, as_json)
        return
    if chart is not None or report_json is not None:
        raise ExpertmixError("--chart and --report-json belong to the bits-per-byte mode: add --bpb (or --reference); "
                             "the perplexity mode saves its routing with --heatmap and prints JSON with --json")
    _refuse_unused({"max_bytes": "--max-bytes", "reference_variant": "--reference-variant"},
                   "the perplexity mode (add --bpb for bits per byte)")
    from .assembler.lightweight import evaluate_lightweight_mix, is_lightweight_mix
    from .assembler.routing_report import evaluate_mix, save_heatmap

    seq_len = fit_seq_len([mix], seq_len, seed=seed_dir)
    if is_lightweight_mix(mix):  # MoV / MoLoRA: routing = each domain's mean merging weight per expert
        report = evaluate_lightweight_mix(mix, _named_sources(data), seq_len=seq_len, max_blocks=max_blocks or None,
                                          batch_size=batch_size, text_field=text_field, seed=seed_dir)
    else:
        report = evaluate_mix(mix, _named_sources(data), seq_len=seq_len, max_blocks=max_blocks or None,
                              batch_size=batch_size, text_field=text_field, seed=seed_dir)
    if heatmap is not None and report.routing is not None:
        save_heatmap(report, heatmap, title=f"{Path(mix).name}: tokens routed to each expert")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    weights = is_lightweight_mix(mix)  # MoV/MoLoRA merge their experts by weight: the share is a mean weight
    table = _table("domain", "perplexity", *report.experts,
                   title="perplexity and routing (" + ("mean merging weight" if weights else "share of tokens") + ")")
    for i, d in enumerate(report.domains):
        shares = [f"{float(x):.0%}" for x in report.routing[i]] if report.routing is not None else []
        table.add_row(d, f"{report.perplexity[d]:.2f}", *shares)
    stdout.print(table)
    if heatmap is not None:
        stdout.print(f"routing heatmap: {heatmap}" if report.routing is not None
                     else "no routing heatmap: the model has no router (a dense merge or model)", highlight=False)


# -- federated training (Flower) --------------------------------------------------------------------

def _parse_nodes(values: tuple[str, ...], valid_values: tuple[str, ...] = ()):
    from .server.local_federation import LocalNode

    def pairs(items: tuple[str, ...], hint: str) -> list[tuple[str, str]]:
        out = []
        for v in items:
            name, sep, path = v.partition("=")
            if not sep or not name or not path:
                raise click.BadParameter(f"{v!r}: use NAME=PATH", param_hint=hint)
            out.append((name, path))
        return out

    nodes = pairs(values, "--node")
    valid = dict(pairs(valid_values, "--node-valid"))
    if unknown := sorted(set(valid) - {n for n, _ in nodes}):
        raise click.BadParameter(f"{', '.join(unknown)}: no --node of that name", param_hint="--node-valid")
    return [LocalNode(name=name, data=Path(path), valid=Path(valid[name]) if name in valid else None)
            for name, path in nodes]


@main.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Seed model folder.")
@click.option("--domain", required=True, help="Domain name recorded in the card.")
@click.option("--node", "nodes", multiple=True, metavar="NAME=PATH",
              help="A local node and its private data (repeatable; one SuperNode each).")
@click.option("--node-valid", "node_valid", multiple=True, metavar="NAME=PATH",
              help="A node's validation data (default: a --valid-fraction of its data is held out).")
@click.option("--work-dir", required=True, type=click.Path(path_type=Path),
              help="Coordinator folder: checkpoints, logs, Flower state; rerunning resumes from the last round.")
@click.option("--name", default=None, help="Expert name (NAME or ORG/NAME); default: the domain.")
@click.option("--base-id", default=None, help="Id of the base model written to the card (default: folder name).")
@click.option("--peft", "kind", type=click.Choice(["dense", "lora"]), default="dense", show_default=True,
              help="dense: all weights travel; lora: only the adapter travels.")
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--local-steps", type=int, default=20, show_default=True, help="Optimizer steps per node and round.")
@click.option("--strategy", type=click.Choice(["fedavg", "fedprox", "fedavgm"]), default="fedavg", show_default=True)
@click.option("--proximal-mu", type=float, default=0.01, show_default=True, help="FedProx's proximal weight.")
@click.option("--server-lr", type=float, default=1.0, show_default=True, help="FedAvgM: server step size.")
@click.option("--server-momentum", type=float, default=0.0, show_default=True, help="FedAvgM: server momentum.")
@click.option("--fraction-train", type=float, default=1.0, show_default=True, help="Share of nodes per round.")
@click.option("--fraction-evaluate", type=float, default=1.0, show_default=True)
@click.option("--min-nodes", type=int, default=2, show_default=True, help="Nodes a round needs.")
@click.option("--evaluate-every", type=int, default=0, show_default=True,
              help="Federated evaluation every N rounds; always after the last (0: only then: each round's "
                   "replies already evaluate the state the nodes received).")
@click.option("--round-timeout", type=float, default=3600, show_default=True, help="Seconds a round waits.")
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="A node's batch on average: the round's global batch is this times the nodes in the round.")
@click.option("--batch-split", type=click.Choice(["by-data", "equal"]), default="by-data", show_default=True,
              help="by-data: split the global batch over the nodes by their training tokens; equal: each takes "
                   "--batch-size.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
              help="Learning rate over the rounds.")
@click.option("--warmup", type=float, default=0.1, show_default=True,
              help="Share of the federation's steps (rounds x local steps) that ramps the rate up.")
@click.option("--keep-optimizer/--fresh-optimizer", default=True, show_default=True,
              help="Nodes keep their AdamW moments between rounds, or start a fresh optimizer every round.")
@click.option("--local-warmup", type=float, default=0.0, show_default=True,
              help="Share of each round's local steps that ramps the rate up again (for --fresh-optimizer).")
@click.option("--valid-fraction", type=float, default=0.05, show_default=True)
@click.option("--lora-r", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--embedder", default="seed", show_default=True,
              help="'seed', 'minilm' or a sentence-transformers folder.")
@click.option("--dp-clip", type=float, default=0.0, help="Clip each node's update to this L2 norm (central DP).")
@click.option("--dp-noise", type=float, default=0.0, help="Gaussian noise multiplier (needs --dp-clip).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Expert folder (default: WORK_DIR/expert).")
@click.option("--no-publish", is_flag=True, help="Write the expert but do not publish it.")
@click.option("--threads-per-node", type=int, default=1, show_default=True)
@click.option("--debug-dir", type=click.Path(path_type=Path), default=None,
              help="Nodes save every state they send here (for checking the aggregation).")
@click.option("--app-only", is_flag=True,
              help="Only write the Flower app (WORK_DIR/app) for a real deployment, and print how to run it.")
@_registry_option
def federate(base, domain, nodes, node_valid, work_dir, name, base_id, kind, rounds, local_steps, strategy, proximal_mu,
             server_lr, server_momentum, fraction_train, fraction_evaluate, min_nodes, evaluate_every, round_timeout,
             seq_len, batch_size, batch_split, grad_accum, lr, lr_schedule, warmup, keep_optimizer, local_warmup,
             valid_fraction, lora_r, embedder,
             dp_clip, dp_noise, seed,
             out, no_publish, threads_per_node, debug_dir, app_only, registry):
    """Train one expert across nodes with Flower: a local SuperLink, a SuperNode per --node, flwr run."""
    from .checkpoints import require_context, require_float_weights
    from .client.settings import FederationConfig
    from .hub.repo import validate_name
    from .server.local_federation import LocalFederation, run_local_federation, write_app

    cfg = FederationConfig.from_run_config(dict(
        base=str(base.resolve()), domain=domain, work_dir=str(work_dir.resolve()), name=name or "",
        base_id=base_id or "", kind=kind, rounds=rounds, local_steps=local_steps, batch_size=batch_size,
        batch_split=batch_split, grad_accum=grad_accum, lr=lr, lr_schedule=lr_schedule, warmup=warmup,
        keep_optimizer=keep_optimizer,
        local_warmup=local_warmup, seq_len=seq_len,
        valid_fraction=valid_fraction,
        strategy=strategy, proximal_mu=proximal_mu, server_lr=server_lr, server_momentum=server_momentum,
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate, min_nodes=min_nodes, round_timeout=round_timeout,
        evaluate_every=evaluate_every, lora_r=lora_r, embedder=embedder, seed=seed, dp_clip=dp_clip,
        dp_noise=dp_noise, out=str(out.resolve()) if out else "", registry=registry or "", publish=not no_publish))
    if app_only:  # checked here as far as this machine can: the deployment runs the app with its own files
        validate_name(cfg.expert_name)
        if node_valid:
            raise click.UsageError("--node-valid names local nodes; a deployment's node gives 'valid' in its "
                                   "node config")
        if (base / "config.json").is_file():
            require_float_weights(base, "federated training")
            require_context(base, seq_len)
        else:
            _log(f"note: the seed {base} is not on this machine; the coordinator must have it at that path")
        app = write_app(work_dir / "app", cfg)
        stdout.print(f"Flower app written to {app}\nstart it on the coordinator with: flwr run {app} <superlink>",
                     highlight=False)
        return
    if not nodes:
        raise click.UsageError("give the local nodes with --node NAME=PATH (or --app-only for a deployment)")
    result = run_local_federation(LocalFederation(cfg, _parse_nodes(nodes, node_valid),
                                                  threads_per_node=threads_per_node,
                                                  debug_dir=debug_dir.resolve() if debug_dir else None), log=_log)
    stdout.print(f"expert written to {result['expert']}" +
                 (f"; published {result['published']}" if result["published"] else ""), highlight=False)


# -- quickstart -------------------------------------------------------------------------------------

@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to work (default: $EXPERTMIX_HOME/quickstart). Rerunning resumes.")
@click.option("--seed-steps", type=int, default=300, show_default=True)
@click.option("--expert-steps", type=int, default=150, show_default=True)
@click.option("--align-steps", type=int, default=80, show_default=True,
              help="RLOO steps of the alignment stage (0: skip).")
@_registry_option
def quickstart(workdir, seed_steps, expert_steps, align_steps, registry):
    """Build a tiny seed, train an expert per synthetic domain, publish them and compare perplexities."""
    from .hub.store import expertmix_home, open_registry
    from .quickstart import QuickstartConfig, run_quickstart

    cfg = QuickstartConfig(workdir=workdir or expertmix_home() / "quickstart", seed_steps=seed_steps,
                           expert_steps=expert_steps, align_steps=align_steps)
    result = run_quickstart(cfg, open_registry(registry), log=_log)
    table = _table("model", *next(iter(result["table"].values())).keys(), title="validation perplexity")
    for label, row in result["table"].items():
        best = {d: min(r[d] for r in result["table"].values()) for d in row}
        table.add_row(label, *[f"[bold]{v:.2f}[/bold]" if v == best[d] else f"{v:.2f}" for d, v in row.items()])
    stdout.print(table)
    for domain, ref in result["published"].items():
        stdout.print(f"{domain}: {ref}", highlight=False)
    if result["alignment"]:
        a = result["alignment"]
        stdout.print(f"aligned arithmetic expert (RLOO, reward = correct sums): held-out reward "
                     f"{a['reward_before']:.3f} → {a['reward_after']:.3f}, KL {a['kl']:.3f}", highlight=False)


if __name__ == "__main__":  # python -m expertmix.cli
    sys.exit(main())
