"""Topic names of the pool protocol: <topic_root>/<site>/<node>/{birth,state,capacity,evt,cmd/...}."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("birth", "state", "capacity", "evt")  # what a node publishes
VERBS = ("infer", "rebirth", "drain", "resume", "bench")  # what a node answers under cmd/


@dataclass(frozen=True, slots=True)
class NodeTopics:
    """The topics of one node."""

    root: str
    site: str
    node: str

    @property
    def base(self) -> str:
        return f"{self.root}/{self.site}/{self.node}"

    @property
    def birth(self) -> str:
        return f"{self.base}/birth"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def capacity(self) -> str:
        return f"{self.base}/capacity"

    @property
    def evt(self) -> str:
        return f"{self.base}/evt"

    @property
    def commands(self) -> str:
        """The filter the node subscribes to."""
        return f"{self.base}/cmd/#"

    def command(self, verb: str, argument: str | None = None) -> str:
        return f"{self.base}/cmd/{verb}" + (f"/{argument}" if argument else "")

    def parse_command(self, topic: str) -> tuple[str, str | None] | None:
        """(verb, argument) of a topic under cmd/, e.g. ("infer", "resnet"); None for any other topic."""
        prefix = f"{self.base}/cmd/"
        if not topic.startswith(prefix):
            return None
        verb, _, argument = topic[len(prefix) :].partition("/")
        return verb, argument or None


@dataclass(frozen=True, slots=True)
class NodeMessage:
    """Where a node message came from, as the platform side reads a topic."""

    site: str
    node: str
    kind: str


def node_filter(root: str, kind: str = "+", *, site: str = "+", node: str = "+") -> str:
    """A subscription filter for what nodes publish, e.g. every node's capacity: ecp/v1/+/+/capacity."""
    return f"{root}/{site}/{node}/{kind}"


def shared(group: str | None, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: each message goes to one member of `group` (ingest scale-out)."""
    return f"$share/{group}/{topic_filter}" if group else topic_filter


def parse_node_topic(root: str, topic: str) -> NodeMessage | None:
    """Site, node and kind of a topic a node publishes; None for anything else (commands, replies)."""
    prefix = f"{root}/"
    if not topic.startswith(prefix):
        return None
    levels = topic[len(prefix) :].split("/")
    if len(levels) != 3 or levels[2] not in KINDS:
        return None
    return NodeMessage(*levels)
