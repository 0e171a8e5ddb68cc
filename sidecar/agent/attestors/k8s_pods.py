"""The kubelet's pod list as values, the container a process runs in, and its ``k8s`` selectors: no I/O.

The kubelet's ``/pods`` endpoint answers with a ``PodList`` (``{"kind": "PodList", "items":
[...]}``; ``items`` is ``null`` on a node with no pods) of the pods bound to its node, each with
``metadata``, ``spec`` and ``status``. Only what attestation needs is read; everything else is
ignored, so fields added by newer Kubernetes versions change nothing.

A container is found by its ID in ``status.containerStatuses``, ``initContainerStatuses`` or
``ephemeralContainerStatuses`` (``containerID`` is ``<runtime>://<id>``, such as
``containerd://``, ``docker://`` or ``cri-o://``; it is absent while a container is being created).
A malformed pod is left out (and named in :attr:`PodList.skipped`) rather than failing the whole
list: it costs only that pod's containers their selectors. A container ID listed twice is left out
too, as ambiguous; the kernel's cgroup names one container, and only one pod may claim it.

Selectors, with SPIRE's names (``k8s:`` prefix omitted here):

- ``ns``, ``sa``, ``pod-name``, ``pod-uid``, ``node-name``: the pod's namespace, service account,
  name, UID and node;
- ``pod-label:<key>:<value>`` for each label, ``pod-owner:<Kind>:<name>`` and
  ``pod-owner-uid:<Kind>:<uid>`` for each owner reference (a Deployment's pod is owned by a
  ReplicaSet);
- ``pod-image:<image>`` for the image and the image ID (the digest form) of each of the pod's
  containers, ``pod-image-count:<n>`` their number; ``pod-init-image`` and
  ``pod-init-image-count`` likewise for init containers;
- ``container-name:<name>`` and ``container-image:<image>`` (image and image ID) of the container
  the process runs in.

Empty values (an image ID not known yet, a pod with no node name) give no selector.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

from spiffecore.errors import quote

PREFIX: Final = "k8s"

ContainerKind: TypeAlias = Literal["container", "init", "ephemeral"]
_STATUS_FIELDS: Final[tuple[tuple[str, ContainerKind], ...]] = (
    ("containerStatuses", "container"),
    ("initContainerStatuses", "init"),
    ("ephemeralContainerStatuses", "ephemeral"),
)


class PodListError(ValueError):
    """The kubelet's answer is not a pod list (not JSON, or not a ``PodList``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerStatus:
    """One entry of a pod's container statuses: ``container_id`` has no ``<runtime>://`` scheme."""

    name: str
    kind: ContainerKind
    container_id: str | None = None
    image: str = ""
    image_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerReference:
    kind: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Pod:
    """What attestation reads of one pod."""

    uid: str
    name: str
    namespace: str
    service_account: str = ""
    node_name: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    owners: tuple[OwnerReference, ...] = ()
    statuses: tuple[ContainerStatus, ...] = ()

    def selectors(self, container: ContainerStatus) -> frozenset[str]:
        """The ``k8s:`` selectors of ``container`` (one of this pod's statuses) in this pod."""
        containers = [status for status in self.statuses if status.kind == "container"]
        inits = [status for status in self.statuses if status.kind == "init"]
        values = [
            f"ns:{self.namespace}",
            f"pod-name:{self.name}",
            f"pod-uid:{self.uid}",
            f"pod-image-count:{len(containers)}",
            f"pod-init-image-count:{len(inits)}",
            f"container-name:{container.name}",
        ]
        if self.service_account:
            values.append(f"sa:{self.service_account}")
        if self.node_name:
            values.append(f"node-name:{self.node_name}")
        values += [f"pod-label:{key}:{value}" for key, value in self.labels]
        for owner in self.owners:
            values += [f"pod-owner:{owner.kind}:{owner.name}", f"pod-owner-uid:{owner.kind}:{owner.uid}"]
        values += [f"pod-image:{image}" for image in _images(containers)]
        values += [f"pod-init-image:{image}" for image in _images(inits)]
        values += [f"container-image:{image}" for image in _images([container])]
        return frozenset(f"{PREFIX}:{value}" for value in values)


@dataclass(frozen=True, slots=True, kw_only=True)
class PodList:
    """The pods of a node, and each container ID's pod and status.

    ``skipped`` says, for each pod or container ID left out, why (see the module's documentation).
    """

    pods: tuple[Pod, ...]
    skipped: tuple[str, ...] = ()
    by_container: Mapping[str, tuple[Pod, ContainerStatus]] = field(default_factory=dict, repr=False, compare=False)

    def find(self, container_id: str) -> tuple[Pod, ContainerStatus] | None:
        """The pod and status of the container with this ID (no scheme), or ``None``."""
        return self.by_container.get(container_id)

    @property
    def node_names(self) -> frozenset[str]:
        """The nodes the pods are bound to (one, for a kubelet's list; none if no pod names it)."""
        return frozenset(pod.node_name for pod in self.pods if pod.node_name)


def parse_pod_list(data: bytes) -> PodList:
    """The kubelet's ``/pods`` answer as a :class:`PodList`; :class:`PodListError` if it is none."""
    try:
        # UTF-8, as the API writes it (json.loads would guess UTF-16 or UTF-32 from the first bytes).
        document = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PodListError(f"the answer is not JSON: {_reason(err)}") from err
    return pod_list(document)


def pod_list(document: Any) -> PodList:
    """A decoded ``PodList`` document as a :class:`PodList`; :class:`PodListError` if it is none."""
    if not isinstance(document, dict):
        raise PodListError(f"the answer is not a PodList: a JSON {_json_type(document)}, not an object")
    kind = document.get("kind", "PodList")
    if kind != "PodList":
        raise PodListError(f"the answer is not a PodList: its kind is {quote(kind)}")
    items = document.get("items", None)
    if items is None:
        items = []
    if not isinstance(items, list):
        raise PodListError(f"the answer is not a PodList: items is a JSON {_json_type(items)}, not an array")
    pods: list[Pod] = []
    skipped: list[str] = []
    for index, item in enumerate(items):
        try:
            pods.append(_pod(item))
        except ValueError as err:
            skipped.append(f"pod {index}: {err}")
    by_container: dict[str, tuple[Pod, ContainerStatus]] = {}
    twice: set[str] = set()
    for pod in pods:
        for status in pod.statuses:
            if status.container_id is None:
                continue
            if status.container_id in by_container or status.container_id in twice:
                twice.add(status.container_id)
                by_container.pop(status.container_id, None)
                continue
            by_container[status.container_id] = (pod, status)
    skipped += [f"container ID {container_id} is listed more than once" for container_id in sorted(twice)]
    return PodList(pods=tuple(pods), skipped=tuple(skipped), by_container=by_container)


def container_id(value: str) -> str:
    """The ID in a status's ``containerID`` (``containerd://<id>``); ``ValueError`` if it has no scheme."""
    scheme, separator, identifier = value.partition("://")
    if not separator or not scheme or not identifier:
        raise ValueError(f"containerID {quote(value)} is not <runtime>://<id>")
    return identifier


# --- reading one pod -----------------------------------------------------------------------------


def _pod(item: Any) -> Pod:
    item = _object(item, "the pod")
    metadata = _object(item.get("metadata"), "metadata")
    spec = _object(_or_empty(item.get("spec"), {}), "spec")
    status = _object(_or_empty(item.get("status"), {}), "status")
    uid = _text(metadata, "uid", "metadata", required=True)
    name = _text(metadata, "name", "metadata", required=True)
    where = f"pod {quote(name)}"
    labels = _object(_or_empty(metadata.get("labels"), {}), f"metadata.labels of {where}")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise ValueError(f"label {quote(key)} of {where} is a JSON {_json_type(value)}, not a string")
    owners = _or_empty(metadata.get("ownerReferences"), [])
    if not isinstance(owners, list):
        raise ValueError(f"metadata.ownerReferences of {where} is a JSON {_json_type(owners)}, not an array")
    return Pod(
        uid=uid,
        name=name,
        namespace=_text(metadata, "namespace", f"metadata of {where}", required=True),
        # serviceAccount is the deprecated alias the API still fills in beside serviceAccountName.
        service_account=_text(spec, "serviceAccountName", f"spec of {where}")
        or _text(spec, "serviceAccount", f"spec of {where}"),
        node_name=_text(spec, "nodeName", f"spec of {where}"),
        labels=tuple(sorted(labels.items())),
        owners=tuple(_owner(owner, where) for owner in owners),
        statuses=tuple(_statuses(status, where)),
    )


def _owner(value: Any, where: str) -> OwnerReference:
    owner = _object(value, f"an owner reference of {where}")
    context = f"an owner reference of {where}"
    return OwnerReference(
        kind=_text(owner, "kind", context, required=True),
        name=_text(owner, "name", context, required=True),
        uid=_text(owner, "uid", context, required=True),
    )


def _statuses(status: dict[str, Any], where: str) -> Iterator[ContainerStatus]:
    for key, kind in _STATUS_FIELDS:
        entries = status.get(key, [])
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise ValueError(f"status.{key} of {where} is a JSON {_json_type(entries)}, not an array")
        context = f"status.{key} of {where}"
        for value in entries:
            entry = _object(value, context)
            raw_id = _text(entry, "containerID", context)
            yield ContainerStatus(
                name=_text(entry, "name", context, required=True),
                kind=kind,
                container_id=container_id(raw_id) if raw_id else None,
                image=_text(entry, "image", context),
                image_id=_text(entry, "imageID", context),
            )


def _or_empty(value: Any, empty: Any) -> Any:
    """``empty`` for an absent or ``null`` field (Go encodes a nil map or slice as ``null``)."""
    return empty if value is None else value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a JSON {_json_type(value)}, not an object")
    return value


def _text(document: dict[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = document.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where} has no {key}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key} of {where} is a JSON {_json_type(value)}, not a string")
    if required and not value:
        raise ValueError(f"{key} of {where} is empty")
    return value


def _images(statuses: list[ContainerStatus]) -> list[str]:
    images = {image for status in statuses for image in (status.image, status.image_id) if image}
    return sorted(images)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _reason(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err)
