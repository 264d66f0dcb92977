"""PyTorch runtime: models, offloaded KV caches, InfiniGen controller and the engine.

Floors, each importing only from those above it (and from infinigen_sim.models / policies):
  timing.py      Phase names, PhaseTimer (CUDA events / perf_counter), StepRecord
  model.py       Transformer from a ModelSpec (OPT / Llama parts), prefill/decode attention ops
  transfer.py    Copier: H2D and D2H streams, the host worker (FIFO), events / futures
  kv_cache.py    Planes (token-major row buffers), KVCache hooks, DeviceCache (ideal), OffloadedCache (flexgen)
  quant.py       group-wise quantize / dequantize, QuantizedCache (int4)
  h2o.py         HeavyHitterCache (h2o)
  skew.py        skewing, partial weight index, speculation ops (FoldedSkew for OPT, RotarySkew for Llama)
  infinigen.py   HostPool (counter eviction), InfiniGenCache (infinigen)
  engine.py      Engine: prefill, decode_one_token, generate -> GenerationResult
  checkpoint.py  local Hugging Face checkpoints (load_checkpoint, load_state_dict_hf, save_checkpoint)
  ops.py         decode_ops: per-phase callables for micro-benchmarks
"""
