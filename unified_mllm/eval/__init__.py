"""Evaluation: the world's programmatic judge and, later, the benchmark tasks behind one driver."""
