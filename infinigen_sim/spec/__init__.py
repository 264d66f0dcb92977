"""The shared floor: what both worlds (the profiler's runtime and the simulator) import, and nothing else.

  models.py    the model zoo: layer shapes of every decoder both worlds know
  hardware.py  hardware YAML (infinigen_sim/hw_configs/): loading, base inheritance, validation
  policies.py  what each KV policy keeps, fetches and computes (LayerWork, memory)
  fetch.py     how many rows InfiniGen's speculation selects: the fetch model and its one fit
  ops.py       the one op vocabulary (runtime phases, bundle rows, cost-model ops, trace names)
  work.py      FLOPs and bytes of every compute op: the one op byte model
  bundle.py    the profile bundle schema: the contract between profiler (writer) and simulator (reader)
  io.py        atomic writes and the one resumable CSV
  cli.py       the one command-line helper of every entry point
"""
