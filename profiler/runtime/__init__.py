"""PyTorch runtime: the model, the offloaded KV caches, InfiniGen's controller and the engine.

Modules, each importing only from those above it and from `infinigen_sim.spec` (models, policies, ops):
  cuda_api.py    CUDA: the one door to torch.cuda (streams, events, syncs, generators); tests swap in a stand-in
  timing.py      PhaseTimer (spans named by spec.ops.Op; CUDA events / perf_counter), StepRecord
  model.py       Transformer from a ModelSpec (OPT / Llama parts), prefill/decode attention ops
  transfer.py    Copier: H2D and D2H streams, the host worker (FIFO), events / futures
  kv_cache.py    Planes (token-major row buffers), KVCache hooks, DeviceCache (ideal), OffloadedCache (flexgen)
  quant.py       group-wise quantize / dequantize, QuantizedCache (int4)
  h2o.py         HeavyHitterCache (h2o)
  skew.py        skewing, partial weight index, speculation ops (FoldedSkew for OPT, RotarySkew for Llama),
                 kept beside the model: no parameter is ever written
  infinigen.py   HostPool (counter eviction), InfiniGenCache (infinigen)
  engine.py      Engine: prefill, decode_one_token, generate -> GenerationResult
Weights (checkpoints, the GGUF model) live one floor up in profiler.weights.
"""
