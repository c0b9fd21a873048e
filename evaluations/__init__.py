"""Sample-quality evaluation: evaluator.py (Inception Score, FID, sFID, precision, recall) and its feature networks."""
