"""The driver: the only part of rank1 that knows every role (run lifecycle, loops, eval, plan)."""
