"""The quickstart's recipe: data, model, loss and optimizer step, sampling order, schedule, evaluation.

Torch and Accelerate only. Everything that guards the recipe (settings, checks of files, states, locks, signals,
tracking) lives in the layers around it and is imported from there, never the other way round.
"""
