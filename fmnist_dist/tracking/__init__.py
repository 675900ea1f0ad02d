"""Where a run is tracked: Weights & Biases (through Accelerate's tracker API)."""
