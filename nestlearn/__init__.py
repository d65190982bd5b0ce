"""nestlearn: declarative nested optimization for PyTorch."""
