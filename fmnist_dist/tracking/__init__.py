"""Where a run is tracked: the `Tracker` interface (base), its implementations (W&B, none) and the registry that
`--tracker` chooses from."""
