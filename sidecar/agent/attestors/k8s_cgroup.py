"""Which pod and container a process runs in, read from its ``/proc/<pid>/cgroup``: no I/O here.

The kubelet puts every container of a pod in a cgroup below the pod's own, and the container
runtime names the container's cgroup after the container's ID, so a process's cgroup path names
both. The layouts seen in practice (``<uid>`` is the pod's UID, ``<id>`` the 64 hex digits of the
container's ID):

==================================  =================================================================
cgroupfs driver (v1 and v2)         ``/kubepods/burstable/pod<uid>/<id>`` (``besteffort``, or no QoS
                                    segment for Guaranteed pods); CRI-O: ``.../pod<uid>/crio-<id>``
systemd driver (v1 and v2)          ``/kubepods.slice/kubepods-burstable.slice/``
                                    ``kubepods-burstable-pod<uid_with_underscores>.slice/``
                                    ``cri-containerd-<id>.scope`` (``docker-``, ``crio-`` likewise)
containerd's systemd form (v1)      ``/system.slice/containerd.service/``
                                    ``kubepods-burstable-pod<uid_>.slice:cri-containerd:<id>``
nested nodes (kind)                 ``/kubelet.slice/kubelet-kubepods.slice/``
                                    ``kubelet-kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope``,
                                    or ``/docker/<node's id>/kubepods/besteffort/pod<uid>/<id>``
a private cgroup namespace (v2)     ``/../../kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope``:
                                    paths are relative to the reader's namespace root
==================================  =================================================================

The rule, the same for every layout: the *first* path segment that names a pod gives the pod's
UID, and the segment right after it must name a container; segments deeper than that (a
container that made cgroups of its own) are ignored. Taking the first pod segment matters: a
process that could create cgroups inside its own container's cgroup could name another pod
deeper down, never above. Static pods' UIDs are 32 hex digits without dashes; other pods' are
UUIDs. A process whose path has no pod segment, or a pod segment not followed by a container's
(the pod's own cgroup, CRI-O's ``crio-conmon-<id>`` monitor), is in no container of a pod.

Under cgroup v1 the file has one line per hierarchy (``<id>:<controllers>:<path>``); under v2 one
line, ``0::<path>``; hybrid systems have both. Every line that names a pod and container must name
the same ones, or the file is refused: a process cannot be in two containers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from spiffecore.errors import quote

_HEX: Final = "[0-9a-f]"
_UUID_DASHES: Final = f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
_UUID_UNDERSCORES: Final = f"{_HEX}{{8}}_{_HEX}{{4}}_{_HEX}{{4}}_{_HEX}{{4}}_{_HEX}{{12}}"
_STATIC_UID: Final = f"{_HEX}{{32}}"  # a static pod's UID: a hash of its manifest, no dashes
_ID: Final = f"{_HEX}{{64}}"
_RUNTIMES: Final = "(?:docker|cri-containerd|crio|containerd)"

_POD_UID: Final = re.compile(f"{_UUID_DASHES}|{_STATIC_UID}")
_CONTAINER_ID: Final = re.compile(_ID)
# cgroupfs driver: "pod<uid>".
_POD_CGROUPFS: Final = re.compile(f"pod(?P<uid>{_UUID_DASHES}|{_STATIC_UID})")
# systemd driver: "[<prefix>-]kubepods[-<qos>]-pod<uid with underscores>.slice".
_POD_SLICE: Final = f"(?:[a-z0-9]+-)*kubepods(?:-burstable|-besteffort)?-pod(?P<uid>{_UUID_UNDERSCORES}|{_STATIC_UID})"
_POD_SYSTEMD: Final = re.compile(f"{_POD_SLICE}\\.slice")
# containerd's "slice:prefix:name" form, pod and container in one segment.
_POD_AND_CONTAINER: Final = re.compile(f"{_POD_SLICE}\\.slice:{_RUNTIMES}:(?P<id>{_ID})")
# "<id>" (cgroupfs), "<runtime>-<id>.scope" (systemd), "crio-<id>" (CRI-O on cgroupfs).
_CONTAINER: Final = re.compile(f"(?P<bare>{_ID})|{_RUNTIMES}-(?P<id>{_ID})(?:\\.scope)?")


@dataclass(frozen=True, slots=True, kw_only=True)
class PodContainer:
    """A container of a pod, as a process's cgroup names it.

    ``pod_uid`` is written as the API writes ``metadata.uid`` (dashes, or 32 hex digits for a static
    pod); ``container_id`` is the runtime's ID without its ``containerd://``-style scheme.
    """

    pod_uid: str
    container_id: str

    def __post_init__(self) -> None:
        if not _POD_UID.fullmatch(self.pod_uid):
            raise ValueError(f"pod UID must be a UUID or 32 hex digits, not {self.pod_uid!r}")
        if not _CONTAINER_ID.fullmatch(self.container_id):
            raise ValueError(f"container ID must be 64 hex digits, not {self.container_id!r}")


def container_of_path(path: str) -> PodContainer | None:
    """The pod and container a cgroup path names, or ``None`` (see the module's rule)."""
    segments = [segment for segment in path.split("/") if segment]
    for index, segment in enumerate(segments):
        both = _POD_AND_CONTAINER.fullmatch(segment)
        if both is not None:
            return PodContainer(pod_uid=_dashed(both["uid"]), container_id=both["id"])
        pod = _POD_CGROUPFS.fullmatch(segment) or _POD_SYSTEMD.fullmatch(segment)
        if pod is None:
            continue
        following = segments[index + 1] if index + 1 < len(segments) else ""
        container = _CONTAINER.fullmatch(following)
        if container is None:
            return None
        return PodContainer(pod_uid=_dashed(pod["uid"]), container_id=container["bare"] or container["id"])
    return None


def container_of_cgroup(data: bytes) -> PodContainer | None:
    """The pod and container ``/proc/<pid>/cgroup`` names, or ``None`` for a process in none.

    ``ValueError`` naming the line if a line is not ``<hierarchy id>:<controllers>:<path>``, if
    the file is empty, or if two lines name different containers.
    """
    text = data.decode("utf-8", "surrogateescape")
    found: PodContainer | None = None
    lines = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue
        lines += 1
        hierarchy, colon, rest = line.partition(":")
        _controllers, colon2, path = rest.partition(":")
        if not colon or not colon2 or not hierarchy.isascii() or not hierarchy.isdigit():
            raise ValueError(f"line {number} is not <hierarchy id>:<controllers>:<path>: {quote(line)}")
        if not path.startswith("/"):
            raise ValueError(f"line {number} has a path that does not start with '/': {quote(line)}")
        located = container_of_path(path)
        if located is None:
            continue
        if found is not None and located != found:
            raise ValueError(
                f"line {number} names container {located.container_id} of pod {located.pod_uid}, an earlier "
                f"line container {found.container_id} of pod {found.pod_uid}"
            )
        found = located
    if not lines:
        raise ValueError("no cgroup lines")
    return found


def _dashed(uid: str) -> str:
    """A pod UID as the API writes it: the systemd driver escapes its dashes as underscores."""
    return uid.replace("_", "-")
