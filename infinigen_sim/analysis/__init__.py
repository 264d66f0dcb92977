"""Analyses over simulated and measured points: validation against the runtime, what-if sensitivity,
capacity planning and the report.

  validate.py     every run of a bundle's steps.csv replayed from its kernels and copies, and compared
  sensitivity.py  elasticities, host-link sweeps, memory fit, one step's timeline
  plan.py         the cheapest (hardware, policy, batch) meeting a target; the Pareto front
  report/         report.html and report.md
"""
