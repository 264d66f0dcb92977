"""The real world: an executing InfiniGen runtime and the profiler that measures it."""
