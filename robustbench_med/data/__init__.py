"""Datasets: the embedded phantom world and loaders for real data (registered on import)."""
