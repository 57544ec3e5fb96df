"""Flower ClientApp: a contributor's node trains the federated expert on its private data (``client.app``)."""
