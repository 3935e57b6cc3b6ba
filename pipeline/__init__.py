"""The segment job's data plane: config types, sources, decoding, the segmenter actor, commits and the Ray Data plan.

Never parses YAML and never calls `ray.init`: it receives typed config objects from `jobs/`.
"""
