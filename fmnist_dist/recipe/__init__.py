"""The quickstart's recipe, in the tutorial's order: data (data.py), model and its saved weights (model.py), loss,
optimizer and the train step (train_step.py), the test step (evaluation.py); and what makes it distributed and
resumable: each epoch's global order (sampling.py), the position in it and how a step's images are split
(position.py), the learning-rate schedule (schedule.py).

Torch and Accelerate only, and plain values in: everything that guards the recipe (settings, checks of files,
states, locks, signals, tracking) lives in the layers around it and imports it, never the other way round.
"""
