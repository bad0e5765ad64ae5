"""Shared test set-up. Tests run on CPU with tiny models and tiny images."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain's multiprocess prefetch reads absl flags; under pytest they were never parsed.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
