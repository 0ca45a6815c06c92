"""Where dstackctl's verdict on a service file differs from dstack 0.22.5's, and why.

A key is a regular expression that must match a whole case id (`re.fullmatch`; ids are
`sample/...`, `example/...`, `case/...`, `gen/...`, see corpus.py and generated.py); the value is
the reason, one sentence. A case that an entry matches must still be judged differently by
the two (test_same_verdict_as_dstack checks it), so when a difference goes away the test says
so and the entry is removed. The first matching entry gives the reason shown.

Reasons start with
- "pending issue 12:" when the difference exists only because part of replica groups, routers,
  `dstack:` or dstack's validation rules is not built in dstackctl yet;
- "pending issue 13:" when it needs replica ranges with autoscaling;
- "no issue yet:" when it is neither planned nor meant: someone has to decide (and file it);
- anything else: a difference dstackctl keeps on purpose, and why.
"""

from __future__ import annotations

_RANGES = (
    "pending issue 13: a range of replicas with `scaling` needs autoscaling, which dstackctl refuses "
    "for now (`set a fixed number`)."
)
_GROUP_RANGES = (
    "pending issue 13: dstack's example has replica groups whose counts are ranges with `scaling`, "
    "which need autoscaling."
)
_NUMBERS = (
    "no issue yet: dstackctl's models are strict and refuse a YAML number where a string is "
    "expected, while dstack 0.22.5 turns it into a string (CoreModel's coerce_numbers_to_str), so "
    "such a file runs on dstack and not here."
)
_SCALING_WITHOUT_REPLICAS = (
    "dstackctl refuses `scaling` without a range of `replicas` when it reads the file; dstack's parser "
    "lets it through when `replicas` is omitted, but the file then fails as soon as dstack builds its "
    "replica group (ReplicaGroup: 'To use `scaling`, `replicas` must be set to a range')."
)

KNOWN_DIFFERENCES: dict[str, str] = {
    # --- dstack's own examples (tests/data/dstack_examples) ------------------------------------
    r"example/mkdocs__blog__posts__agentic-orchestration\.md__block01": _RANGES,
    r"example/mkdocs__blog__posts__volumes-on-runpod\.md__block0[12]": _RANGES,
    r"example/mkdocs__docs__concepts__services\.md__block0[34]": _RANGES,
    r"example/mkdocs__blog__posts__amd-pd-disaggregation\.md__block01": _GROUP_RANGES,
    r"example/mkdocs__blog__posts__nvidia-dynamo\.md__block01": _GROUP_RANGES,
    r"example/mkdocs__blog__posts__smg\.md__block01": _GROUP_RANGES,
    r"example/mkdocs__docs__concepts__services\.md__block0[56]": _GROUP_RANGES,
    r"example/mkdocs__docs__examples__inference__sglang\.md__block0[34]": _GROUP_RANGES,
    r"example/mkdocs__docs__examples__inference__vllm\.md__block03": _GROUP_RANGES,
    # --- hand-written cases (cases.py) ----------------------------------------------------------
    r"case/ok-range-(with-scaling|from-zero|without-minimum)": _RANGES,
    r"case/ok-scaling-(window-30s|window-5m|delays)": _RANGES,
    r"case/ok-group-range-with-scaling": _RANGES,
    r"case/ok-(user|commands|group-name)-number": _NUMBERS,
    r"case/ok-scaling-without-replicas": _SCALING_WITHOUT_REPLICAS,
    r"case/ok-duplicate-key": (
        "A key given twice is an error in dstackctl (with both lines); PyYAML, which dstack uses, "
        "silently keeps the last value."
    ),
    r"case/ok-run-name-upper-case": (
        "dstackctl checks the run name against the dstack server's rule (2-41 lower-case letters, "
        "digits and '-') when it reads the file; dstack's parser leaves that to the server."
    ),
    r"case/ok-eleven-probes": (
        "dstackctl refuses more than 10 probes when it reads the file, as the dstack server does "
        "(DSTACK_SERVER_MAX_PROBES_PER_JOB, default 10); dstack's parser leaves that to the server."
    ),
    # --- generated cases (generated.py) ---------------------------------------------------------
    r"gen/range/[^/]+/scaling-service/router-none/cmds": _RANGES,
    r"gen/range/image@service/scaling-service/router-none/nocmds": _RANGES,
    r"gen/groups-range/[^/]+@(service|group)/scaling-group/router-(none|group)/cmds": (
        "pending issue 13: the worker group's count is a range with `scaling`, which needs autoscaling."
    ),
    r"gen/omitted/[^/]+/scaling-service/router-none/cmds": _SCALING_WITHOUT_REPLICAS,
    r"gen/omitted/image@service/scaling-service/router-none/nocmds": _SCALING_WITHOUT_REPLICAS,
}
