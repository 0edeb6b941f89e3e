"""``fedtune promote``: move an alias (``champion``) to a model version when its evaluation beats the holder's.

The scores compared are the ones ``fedtune evaluate`` tags on each version; a version without one is evaluated first.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from training import registry
from training.config import ConfigError


@dataclass(frozen=True)
class Decision:
    promoted: bool
    version: str
    score: float
    holder: str | None  # the version that held the alias before
    holder_score: float | None

    def explain(self, alias: str, split: str, metric: str) -> str:
        ours = f"version {self.version}: {split} {metric} {self.score:.4f}"
        if self.holder is None:
            return f"promoted {ours}; no version held @{alias}"
        sign, verb = (">", "promoted") if self.promoted else ("<=", "declined")
        return f"{verb} {ours} {sign} {self.holder_score:.4f} of version {self.holder}, which holds @{alias}"


def decide(version: str, score: float, holder: str | None, holder_score: float | None) -> Decision:
    """Promote only on a strict improvement, so a tie keeps the version already serving."""
    return Decision(holder is None or score > holder_score, version, score, holder, holder_score)


def recorded_score(client, name: str, version: str, split: str, metric: str, out) -> tuple[float, str | None]:
    """(score, dataset fingerprint) from the version's tags, evaluating it first when it has none."""
    tags = client.get_model_version(name, version).tags
    if f"eval.{split}.{metric}" not in tags:
        print(f"version {version} has no {split} evaluation yet; evaluating it", file=out)
        registry.evaluate(client, registry.version_target(client, name, version), split, out=out)
        tags = client.get_model_version(name, version).tags
    return float(tags[f"eval.{split}.{metric}"]), tags.get(f"eval.{split}.dataset")


def promote(client, name: str, version: str | None, alias: str, from_alias: str, split: str, metric: str,
            out=None) -> Decision | None:
    """Move ``alias`` to the version when it beats the holder's score; returns None when it already holds it."""
    out = out or sys.stdout
    aliases = registry.registered_model(client, name).aliases
    version = version or aliases.get(from_alias)
    if version is None:
        raise ConfigError(f"model {name!r} has no alias {from_alias!r}; pass --version with one of versions "
                          f"{registry.versions(client, name)} or --from with one of its aliases {sorted(aliases)}")
    version = registry.version_target(client, name, str(version)).version  # an unknown --version is refused here
    holder = str(aliases[alias]) if alias in aliases else None
    if holder == version:
        print(f"version {version} already holds @{alias}; nothing to do", file=out)
        return None
    ours, data = recorded_score(client, name, version, split, metric, out)
    theirs, their_data = recorded_score(client, name, holder, split, metric, out) if holder else (None, data)
    if data != their_data:
        raise ConfigError(f"versions {version} and {holder} were last evaluated on different data ({data} vs "
                          f"{their_data}); evaluate both on the same --data, then promote again")
    decision = decide(version, ours, holder, theirs)
    if decision.promoted:
        client.set_registered_model_alias(name, alias, version)
    message = decision.explain(alias, split, metric)
    client.set_model_version_tag(name, version, f"promote.{alias}", message)
    print(message, file=out)
    return decision
