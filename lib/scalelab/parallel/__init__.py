"""Chapters 07-08: data parallelism (`data_parallel`) and model parallelism (`model_parallel`).

Both are re-exported here, so ``from scalelab import parallel; parallel.train_pmap(...)`` and
``parallel.gpipe_step(...)`` work; each concern lives in its own file.
"""

from scalelab.parallel.data_parallel import *  # noqa: F403
from scalelab.parallel.model_parallel import *  # noqa: F403
