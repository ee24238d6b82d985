"""Example pipelines of luigi_daisy (``luigi --module examples.segmentation ...``).

``pip install -e .`` makes this folder importable as ``examples`` from anywhere: the
``luigi`` command does not put the current folder on ``sys.path``, and worker processes
rebuild their task by importing its module.
"""
