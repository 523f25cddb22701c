"""actgrad: see inside a neural network while it trains."""
