"""alfstudy: the paper's study above both packages - plan -> jobs -> executors -> results -> report.

`plan` says what is wanted and reachable, `jobs` cuts it into tasks and drops what is already done, `tasks` is the
work of one task (extract a dataset for its models, train a pair's heads, build the report), `executors` run the
tasks in this process or as Slurm job arrays (submitit), `state` keeps each task's small durable marker,
`status` reads the whole study back from the markers, `results` / `report` / `layerwise` / `cka` turn result files
into tables and pictures. alfcache and probes never import this package.
"""
