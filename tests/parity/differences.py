"""Where dstackctl's verdict on a service file differs from dstack 0.22.5's, and why.

A key is a regular expression that must match a whole case id (`re.fullmatch`; ids are
`sample/...`, `example/...`, `case/...`, `gen/...`, see corpus.py and generated.py); the value is
the reason, one sentence. A case that an entry matches must still be judged differently by
the two (test_same_verdict_as_dstack checks it), so when a difference goes away the test says
so and the entry is removed. The first matching entry gives the reason shown.

Reasons start with
- "pending issue 12:" when the difference exists only because part of replica groups, routers,
  `dstack:` or dstack's validation rules is not built in dstackctl yet;
- "no issue yet:" when it is neither planned nor meant: someone has to decide (and file it);
- anything else: a difference dstackctl keeps on purpose, and why.
"""

from __future__ import annotations

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
    # --- hand-written cases (cases.py) ----------------------------------------------------------
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
    r"gen/omitted/[^/]+/scaling-service/router-none/cmds": _SCALING_WITHOUT_REPLICAS,
    r"gen/omitted/image@service/scaling-service/router-none/nocmds": _SCALING_WITHOUT_REPLICAS,
}
