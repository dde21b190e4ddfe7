"""``seqio_user_tasks`` with TFDS mocked for the whole process (a --module for subprocesses)."""

import tensorflow_datasets as tfds

# Kept in a module global: a collected context manager would close and undo the mock.
MOCK = tfds.testing.mock_data(num_examples=64)
MOCK.__enter__()  # stays on until the process exits

import seqio_user_tasks  # noqa: E402,F401  (registers the tasks)
