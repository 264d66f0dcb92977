"""infinigen-sim: the model world (hardware, costs, SimPy replay, sweeps, reports)."""
