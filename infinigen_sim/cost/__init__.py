"""What an op, a copy, a host overhead or the memory of a point costs.

  physics.py    the CostModel interface and its roofline default (hardware YAML peaks x efficiencies)
  memory.py     where a point's bytes live and whether they fit
  card.py       the profiled box read off a bundle: measured rows, its ceilings as a HardwareConfig
  grid.py       a log-log grid of seconds, a non-negative affine fit
  tables.py     measured kernel and copy tables with fitted rooflines
  overheads.py  the CPU runtime's own Python costs, from a CPU bundle
  calibrate.py  a bundle as a CostModel (BundleCosts), per sweep point
"""
