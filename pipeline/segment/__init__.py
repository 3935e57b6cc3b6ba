"""The segment job's data plane, one module per stage: `plan` → `read` → `infer` → `write`, tied together per work
unit by `worker` (the Ray Data actor class) and driven by `run`; `config`, `schema` (the output contract) and `lease`
(one run per output) beside them. See docs/segment-job.md.
"""
