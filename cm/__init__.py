"""Consistency models (Song, Dhariwal, Chen, Sutskever, ICML 2023) in PyTorch."""
