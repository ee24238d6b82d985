"""Counts the workers started in ``worker_count`` (folder given as argument). The first
one processes a single block and exits with code 0 while blocks remain; later ones take
blocks, half a second each, until none is left."""

import os
import sys
import time

from filelock import FileLock

import luigi_daisy as daisy

folder = sys.argv[1]
counter = os.path.join(folder, "worker_count")
with FileLock(os.path.join(folder, "count.lock")):
    with open(counter) as file:
        started = int(file.read())
    with open(counter, "w") as file:
        file.write(str(started + 1))
    first_marker = os.path.join(folder, "first_worker_done")
    is_first = not os.path.exists(first_marker)
    if is_first:
        with open(first_marker, "w") as file:
            file.write("done")

client = daisy.Client()
if is_first:
    with client.acquire_block() as block:
        pass
else:
    while True:
        with client.acquire_block() as block:
            if block is None:
                break
            time.sleep(0.5)
