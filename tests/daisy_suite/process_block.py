"""A daisy-style worker: holds ``worker_<id>.lock`` in the folder given as argument while
it takes blocks until none is left, spending up to a second on each."""

import random
import sys
import time

from filelock import FileLock

import luigi_daisy as daisy

folder = sys.argv[1]
client = daisy.Client()
with FileLock(f"{folder}/worker_{client.worker_id}.lock"):
    while True:
        with client.acquire_block() as block:
            if block is None:
                break
            time.sleep(random.random())
