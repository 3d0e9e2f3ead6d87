"""A static model of the Triton backend on an H200: SASS census, structural checks, predicted times.

Nothing here runs on a GPU. ``python -m benchmarks.gpu_model --help`` lists the commands; every time
it reports is a prediction. ``docs/gpu-model.md`` says how to read it and how far to trust it.
"""
