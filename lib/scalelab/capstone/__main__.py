"""``python -m scalelab.capstone``: the crash test's training process."""

from scalelab.capstone.training import worker

worker()
