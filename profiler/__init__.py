"""The real world: an executing InfiniGen runtime and the profiler that measures it.

Floors, each importing only from those below it and from `infinigen_sim.spec` (never the simulator):
  runtime/    the engine and its KV caches (model, caches, InfiniGen controller, timing)
  weights/    local HF checkpoints, the GGUF SmolLM2 loader, the pretrained registry, the shipped texts
  bench/      what profiler.collect measures with: copies, ops, end-to-end steps, handoffs, fetch counts
  studies/    the accuracy study and the skewing statistics on a real model
  collect.py, run.py, accuracy.py, skew_stats.py   thin CLIs on top (python -m profiler.NAME)
"""
