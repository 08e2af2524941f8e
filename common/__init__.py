"""Plain-Python pieces shared across tidal's layers: no torch, no Ray.

``SamplingParams`` (request data the ingress builds without torch), page accounting
(``PageAllocator``), prefix block hashing and the prefix cache of pages both stages keep,
decayed meters, and the ``Stage`` protocol the worker drives.
"""
