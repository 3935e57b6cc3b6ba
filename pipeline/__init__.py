"""What the jobs run, one subpackage per job: `segment` (the archive's data plane: plan → read → infer → write),
`train` (the Ray Train driver), `results` (reading an output back: query, evaluate), `demo`; and what they share:
`config` (validation of config dicts), `errors`, `retry`.

Never parses YAML and never calls `ray.init`: it receives typed config objects from `jobs/`.
"""
