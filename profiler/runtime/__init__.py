"""PyTorch runtime: models, offloaded KV caches, InfiniGen controller and the engine."""
