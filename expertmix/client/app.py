"""The Flower ``ClientApp`` a contributor's SuperNode runs (Message API).

- ``train``: receives the global state (``arrays``) and the round's ``config`` (``server-round``,
  ``federation-id``, ``base-fingerprint``, ``batch-size``, FedProx's ``proximal-mu``; ``lr`` for the log
  only), trains locally, replies with the new state, a MetricRecord (``num-examples`` = the blocks it trained on
  this round, losses) and a ConfigRecord ``node`` (the node's summary: counts, languages, domain embedding;
  never text).
- ``query``: the node's summary alone, which the coordinator sizes the node's share of the global batch by.
- ``evaluate``: validation loss of the global state on the node's validation data (``num-examples`` = tokens).

Settings come from the run config (:class:`FederationConfig`) and the SuperNode's node config
(:class:`NodeConfig`: ``data``, ``valid``, ``base``, ``name``, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..errors import ExpertmixError
from .node import Node
from .settings import FederationConfig, NodeConfig, node_title

app = ClientApp()


def _names_the_node(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A failure names the node it happened on: the coordinator learns names only from successful replies, so a
    node that fails from its first round would otherwise be reported by its numeric id."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            title = node_title(NodeConfig.from_node_config(dict(context.node_config)).label(context.node_id))
            text = str(exc) if isinstance(exc, ExpertmixError) else f"{type(exc).__name__}: {exc}"
            if text.startswith(f"{title}:"):
                raise
            raise ExpertmixError(f"{title}: {text}") from exc
    return wrapped


def _node(context: Context) -> Node:
    return Node(FederationConfig.from_run_config(dict(context.run_config)),
                NodeConfig.from_node_config(dict(context.node_config)), context.node_id)


@app.train()
@_names_the_node
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the node's private data."""
    node = _node(context)
    config = msg.content["config"]
    result = node.train_round(msg.content["arrays"].to_torch_state_dict(), server_round=int(config["server-round"]),
                              proximal_mu=float(config.get("proximal-mu", 0.0)),
                              base_fingerprint=str(config.get("base-fingerprint", "")) or None,
                              federation_id=str(config.get("federation-id", "")) or None,
                              batch_size=int(config.get("batch-size", 0)) or None)
    content = RecordDict({"arrays": ArrayRecord(result.state), "metrics": MetricRecord(result.metrics),
                          "node": ConfigRecord(result.summary)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_names_the_node
def evaluate(msg: Message, context: Context) -> Message:
    """Validation loss of the global state on the node's validation data."""
    metrics = _node(context).evaluate(msg.content["arrays"].to_torch_state_dict())
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
@_names_the_node
def query(msg: Message, context: Context) -> Message:
    """The node's summary (counts, languages, domain embedding; never text), before it trains."""
    node = _node(context)
    return Message(content=RecordDict({"node": ConfigRecord(node.summary(node.data()))}), reply_to=msg)
