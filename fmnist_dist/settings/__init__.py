"""The settings of each command: one declaration from which flags, defaults, bounds and resume rules derive."""
