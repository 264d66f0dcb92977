"""What `profiler.collect` measures with: each module one table of the profile bundle, or its facts.

  stats.py          Stats / summarize (median, p10, p90), is_oom, time_fn (CUDA events), gc_paused
  transfer_grid.py  the copy sweep's points: sizes, gather row sizes, transfers.csv keys
  transfers.py      TransferBench: each copy point timed (copy stream or worker thread); its summary
  handoff.py        what a layer's copy-worker jobs cost the CPU runtime's compute thread
  kernel_passes.py  the runtime's own calls of a decode step, its policy ops, a prefill, in engine order
  kernels.py        the op sweep: kernels.csv rows per (op, model, batch, n_tokens, kv_len); its summary
  steps.py          end-to-end generations through the engine: steps.csv; its summary
  fetch.py          InfiniGen's speculated rows on a real checkpoint: fetch.csv; its fit's summary
  host.py           meta.yaml's facts: the device, NVML, the host, the software
  budget.py         a CUDA collection's time on one H100/H200 (first principles) and the grid cut to a budget
"""
