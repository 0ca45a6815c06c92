"""A service's probes with `${{ env.X }}` replaced by its env values (the one resolver)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from dstackctl.config.fields import PROBE_NAMESPACES
from dstackctl.config.interpolation import interpolate
from dstackctl.config.issues import ConfigError, Issue, Loc, dotted
from dstackctl.config.models import ServiceConfiguration
from dstackctl.config.probe_model import ProbeConfig

Locate = Callable[[Loc, str], Issue]


def _unlocated(loc: Loc, message: str) -> Issue:
    return Issue("the stored spec", None, dotted(loc), message)


def resolve_probes(
    config: ServiceConfiguration, env: Mapping[str, str], locate: Locate = _unlocated
) -> list[ProbeConfig]:
    """The effective probes, expanded in `url`, header values and `body`.

    Raises ConfigError naming every variable that `env` lacks (with its file and line when
    `locate` is a loaded file's `issue`); values never appear in it.
    """
    values = {"env": env}
    problems: list[Issue] = []

    def expand(loc: Loc, text: str) -> str:
        try:
            return interpolate(text, values, PROBE_NAMESPACES)
        except KeyError as exc:
            problems.append(locate(loc, f"{exc.args[0]} has no value: {exc.args[0].name} is not set"))
            return text

    result = []
    for index, probe in enumerate(config.effective_probes()):
        where: Loc = ("probes", index)
        headers = [
            h.model_copy(update={"value": expand((*where, "headers", i, "value"), h.value)})
            for i, h in enumerate(probe.headers)
        ]
        body = None if probe.body is None else expand((*where, "body"), probe.body)
        result.append(
            probe.model_copy(
                update={"url": expand((*where, "url"), probe.url), "headers": headers, "body": body}
            )
        )
    if problems:
        raise ConfigError(problems)
    return result
