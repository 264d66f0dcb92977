"""infinigen-sim: the model world (hardware, costs, SimPy replay, sweeps, reports) and the floor it shares
with the profiler's runtime.

Floors, each importing only from those below it:
  spec/      models, hardware, policies, the op vocabulary, the bundle schema, IO and CLI helpers (shared)
  cost/      what an op, a copy or a point's memory costs: physics defaults or a calibrated bundle
  sim/       the SimPy replay of one GPU, its host link and its host
  sweep/     grids of points on an executor (here, a pool, Ray) and their results
  analysis/  validation, sensitivity, planning, the report
Command lines on top: sweep/__main__.py, plan.py, report.py, validate.py.
"""
