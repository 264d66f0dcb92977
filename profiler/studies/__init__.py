"""Studies on a real model through the runtime: what InfiniGen's approximations cost and buy.

  accuracy.py    perplexity, top-1 agreement and fetched fraction of each KV policy (the paper's sweep)
  skew_stats.py  skewing's energy concentration and the speculation recall it buys
"""
