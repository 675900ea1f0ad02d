"""The training job: its start (fresh or resumed), the Trainer's loop, and what it saves and reports at the end."""
