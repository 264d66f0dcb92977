"""Sweeps: the grid of points, one point's simulation, executors (this process, a pool, Ray) and the outputs.

  grid.py       SweepGrid, Point, expand_points, --set parsing
  point.py      simulate_point: a point's memory plan, replay and result row
  executors.py  run a function over chunks of points here, in a process pool, or on Ray
  run.py        a sweep on an executor, resumable through DIR/results.partial.csv
  results.py    the partial file, results.csv and config.yaml (their one writer), the printed table
  __main__.py   python -m infinigen_sim.sweep
"""
