"""Re-implementations of published medical architectures (registered on import)."""
