"""The first worker started leaves ``worker_crashed`` in the folder given as argument and
exits with code 1 before taking a block; later workers take blocks until none is left."""

import os
import sys

import luigi_daisy as daisy

folder = sys.argv[1]
marker = os.path.join(folder, "worker_crashed")
if not os.path.exists(marker):
    with open(marker, "w") as file:
        file.write("crashed")
    sys.exit(1)

client = daisy.Client()
while True:
    with client.acquire_block() as block:
        if block is None:
            break
