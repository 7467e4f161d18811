"""Applying a ``[profiles.NAME]`` to a request: the profile fills what the request left unset.

Model: the profile's when the request names none. Sampling: each field the request left None
(stop: empty). System prompt: prepended to a chat that has no system message. Priority: the
profile's when the request kept the default (normal), since the wire cannot tell "normal on
purpose" from "not given". Tools: the profile's tool set (and its tool_choice) for a chat request
that offers none of its own.
"""

from __future__ import annotations

import msgspec

from tokenhive.schemas.gateway_config import Profile
from tokenhive.schemas.messages import Kind, Message, Priority, Request, Sampling


def apply_profile(request: Request, profile: Profile) -> Request:
    changes: dict[str, object] = {}
    if not request.model and profile.model:
        changes["model"] = profile.model
    sampling = _merged(request.sampling, profile.sampling)
    if sampling is not request.sampling:
        changes["sampling"] = sampling
    if (profile.system is not None and request.kind is Kind.CHAT
            and not any(m.role == "system" for m in request.messages)):
        changes["messages"] = [Message(role="system", content=profile.system),
                               *request.messages]
    if profile.tools and request.kind is Kind.CHAT and not request.tools:
        changes["tools"] = list(profile.tools)
        if request.tool_choice is None:
            changes["tool_choice"] = profile.tool_choice
    if profile.priority is not None and request.priority == Priority.NORMAL:
        changes["priority"] = profile.priority
    return msgspec.structs.replace(request, **changes) if changes else request


def _merged(mine: Sampling, defaults: Sampling) -> Sampling:
    changes: dict[str, object] = {}
    for field in Sampling.__struct_fields__:
        value, default = getattr(mine, field), getattr(defaults, field)
        if field == "stop":
            if not value and default:
                changes[field] = list(default)
        elif value is None and default is not None:
            changes[field] = default
    return msgspec.structs.replace(mine, **changes) if changes else mine
